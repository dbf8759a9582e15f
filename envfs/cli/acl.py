"""Who may read a workflow's envs: acl set, acl show, acl rm."""

from __future__ import annotations

import click

from envfs.cli.app import _emit, _service, main
from envfs.core.errors import BadInput, NotFound
from envfs.service.access import DEFAULT_MODE


@main.group()
def acl() -> None:
    """Who may read a workflow's envs, on every node.

    A workflow with an ACL is shown on every node's mount as a directory of root and the
    ACL's group with its mode (0750 by default: nothing for others), so the kernel refuses
    every path into its envs (WF/NODE, WF/NODE@REV, kernel-served or not) to users outside
    the group, and .snapshots/<id> of a snapshot only restricted workflows bind too.
    Workflows without an ACL stay readable by all. A change reaches every node as a bind
    does (within about 2 s). The group must exist, with that name, on every node.
    """


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise BadInput(f"mode {text!r} is not octal, e.g. 0750") from None


@acl.command(name="set")
@click.argument("workflow")
@click.option("--group", "group", required=True, help="The group whose members may read it.")
@click.option(
    "--mode",
    default=f"{DEFAULT_MODE:04o}",
    show_default=True,
    help="Of the workflow's directory: octal, nothing for others (0750, 0710).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def acl_set(ctx: click.Context, workflow: str, group: str, mode: str, as_json: bool) -> None:
    """Restrict WORKFLOW's envs to the members of GROUP (replacing any ACL it had)."""
    result = _service(ctx).set_acl(workflow, group, _mode(mode))
    if as_json:
        _emit(result.model_dump())
    else:
        click.echo(f"{workflow}: readable by group {group} only (mode {result.mode:04o})")


@acl.command(name="show")
@click.argument("workflow", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def acl_show(ctx: click.Context, workflow: str | None, as_json: bool) -> None:
    """The ACL of WORKFLOW, or of every workflow that has one."""
    acls = _service(ctx, quiet=True).list_acls(workflow)
    if workflow is not None and not acls:
        if as_json:
            _emit(None)
            return
        click.echo(f"{workflow}: no ACL (readable by all)")
        return
    if as_json:
        _emit([a.model_dump() for a in acls])
        return
    if not acls:
        click.echo("no workflow has an ACL: every env is readable by all")
    for a in acls:
        click.echo(f"{a.workflow}\tgroup {a.group}\tmode {a.mode:04o}\tset by {a.user}")


@acl.command(name="rm")
@click.argument("workflow")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def acl_rm(ctx: click.Context, workflow: str, as_json: bool) -> None:
    """Drop WORKFLOW's ACL: its envs become readable by all again."""
    if not _service(ctx).remove_acl(workflow):
        raise NotFound(f"{workflow} has no ACL (`envfs acl show` lists those that do)")
    if as_json:
        _emit({"workflow": workflow, "removed": True})
    else:
        click.echo(f"{workflow}: ACL removed, readable by all")
