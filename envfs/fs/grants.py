"""What the mount shows of workflow ACLs (`envfs acl`): a restricted workflow's directory,
and the root of ``.snapshots/<id>`` of a snapshot only restricted workflows bind, are shown
as root's and the ACL's group's with its mode. The mount has ``default_permissions``, so the
kernel checks those bits for every user on every path walk (also when a member walked the
same path a moment before: no first user's check is cached for the next one), and every
path into an env passes one of these directories — kernel-served views below a workflow
directory included. A restricted snapshot's ``.snapshots/<id>`` is never kernel-served: a
bind mount there would show the store directory's bits instead."""

from __future__ import annotations

import dataclasses
import stat

from envfs.fs.catalog import Catalog
from envfs.fs.inodes import SNAPSHOTS_INODE, Attr, View, _Dir, _Node, _Workflow


class Grants:
    """The ACL half of a `envfs.fs.vfs.Namespace` (whose tables these are)."""

    _catalog: Catalog
    _inodes: dict[int, _Node]
    _workflows: dict[str, int]
    _views: dict[tuple[str, str, str, str | int], int]

    def _granted(self, node: _Node) -> Attr:
        """``node``'s attributes as the kernel must see them (its grant applied)."""
        if isinstance(node, _Workflow):
            grant = self._catalog.workflow_grant(node.name)
        elif _is_snapshot_root(node):
            assert isinstance(node, _Dir) and node.view is not None
            grant = self._catalog.snapshot_grant(node.view.snapshot_id)
        else:
            return node.attr
        if grant is None:
            return node.attr
        gid, mode = grant
        return dataclasses.replace(node.attr, uid=0, gid=gid, mode=stat.S_IFDIR | mode)

    def granted_inodes(self) -> list[int]:
        """Every inode a grant may apply to (to invalidate in the kernel when they change)."""
        inos = list(self._workflows.values())
        inos += [ino for key, ino in list(self._views.items()) if key[0] == "snapshot"]
        return inos

    def kernel_allowed(self, view: View) -> bool:
        """Whether ``view`` may be kernel-served (a restricted snapshot's id view may not)."""
        return view.kind != "snapshot" or self._catalog.snapshot_grant(view.snapshot_id) is None


def _is_snapshot_root(node: _Node) -> bool:
    return (
        isinstance(node, _Dir)
        and node.view is not None
        and node.view.kind == "snapshot"
        and node.parent == SNAPSHOTS_INODE
    )
