"""The namespace and the build queue without a kernel: a fake in-memory Catalog over temp dirs."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import trio

from envfs.core.errors import BuildFailed, NotFound
from envfs.core.views import BindingView
from envfs.fs.inodes import (
    CACHE_LONG,
    CACHE_NONE,
    CACHE_SHORT,
    ROOT_INODE,
    SNAPSHOT_TIME_NS,
    SNAPSHOTS_INODE,
    Attr,
    NeedsBuild,
    WouldBlock,
)
from envfs.fs.misses import NEGATIVE_TTL
from envfs.fs.nowait import INLINE_IO_ENV
from envfs.fs.vfs import Namespace
from envfs.node.builds import BuildQueue
from envfs.store.files import SnapshotUnreadable
from tests.fusehelpers import write_manifest


class FakeCatalog:
    def __init__(self) -> None:
        self.bindings: dict[tuple[str, str], list[str]] = {}
        self.store: dict[tuple[str, str], list[str]] = {}
        self.snapshots: dict[str, Path] = {}
        self.buildable: dict[str, Path] = {}
        self.store_calls: list[tuple[str, str]] = []
        self.build_calls: list[str] = []
        self.build_delay = 0.0
        self.fail_builds = 0
        self.grants: dict[str, tuple[int, int]] = {}  # workflow or snapshot id -> (gid, mode)

    def workflow_grant(self, workflow: str) -> tuple[int, int] | None:
        return self.grants.get(workflow)

    def snapshot_grant(self, snapshot_id: str) -> tuple[int, int] | None:
        return self.grants.get(snapshot_id)

    def grants_generation(self) -> int:
        return len(self.grants)

    def workflows(self) -> list[str]:
        return sorted({wf for wf, _ in self.bindings})

    def nodes(self, workflow: str) -> list[str]:
        return sorted(node for wf, node in self.bindings if wf == workflow)

    def current(self, workflow: str, node: str) -> BindingView | None:
        revs = self.bindings.get((workflow, node))
        return BindingView(workflow, node, len(revs), revs[-1]) if revs else None

    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        revs = self.bindings.get((workflow, node))
        if not revs or not 1 <= revision <= len(revs):
            return None
        return BindingView(workflow, node, revision, revs[revision - 1])

    def snapshot_dir(self, snapshot_id: str) -> Path | None:
        return self.snapshots.get(snapshot_id)

    def workflow_in_store(self, workflow: str) -> bool:
        return False

    def find_snapshot(self, prefix: str) -> str | None:
        found = [sid for sid in self.snapshots if sid.startswith(prefix)]
        return found[0] if len(found) == 1 else None

    def lookup_store(self, workflow: str, node: str) -> BindingView | None:
        self.store_calls.append((workflow, node))
        revs = self.store.get((workflow, node))
        if revs is None:
            return None
        self.bindings[(workflow, node)] = revs
        return self.current(workflow, node)

    def build(self, snapshot_id: str) -> Path:
        self.build_calls.append(snapshot_id)
        time.sleep(self.build_delay)
        if self.fail_builds:
            self.fail_builds -= 1
            raise BuildFailed(f"cannot build {snapshot_id}: uv said no")
        if snapshot_id not in self.buildable:
            raise NotFound(f"no spec for {snapshot_id}")
        self.snapshots[snapshot_id] = self.buildable[snapshot_id]
        return self.buildable[snapshot_id]

    def hold(self, snapshot_ids: list[str]) -> None:
        pass  # no store: nothing to collect

    def release(self, snapshot_ids: list[str]) -> None:
        pass

    def refresh(self) -> list[tuple[str, str]]:
        return []


def make_snapshot(root: Path, name: str, shared: Path) -> Path:
    snap = root / name
    (snap / "bin").mkdir(parents=True)
    (snap / "lib" / "site-packages").mkdir(parents=True)
    os.symlink("/usr/bin/python3", snap / "bin" / "python")
    os.symlink("python", snap / "bin" / "python3")
    os.link(shared, snap / "lib" / "site-packages" / "shared.py")
    shutil.copyfile(shared, snap / "lib" / "site-packages" / "copy.py")
    (snap / "marker.txt").write_text(name)
    (snap / "pyvenv.cfg").write_text("home = /usr/bin\n")
    write_manifest(snap)
    return snap


class World:
    def __init__(self, tmp: Path) -> None:
        shared = tmp / "shared.py"
        shared.write_text("X = 1\n")
        self.a = make_snapshot(tmp, "A", shared)
        self.b = make_snapshot(tmp, "B", shared)
        self.c = make_snapshot(tmp, "C", shared)
        self.catalog = FakeCatalog()
        self.catalog.bindings = {("wf", "one"): ["A"], ("wf", "two"): ["A", "B"]}
        self.catalog.snapshots = {"A": self.a, "B": self.b}
        self.catalog.buildable = {"C": self.c}
        self.now = 100.0
        self.ns = Namespace(self.catalog, clock=lambda: self.now)

    def walk(self, path: str) -> Attr | None:
        """Resolve a path as the kernel would, doing I/O when needed."""
        ino = ROOT_INODE
        attr: Attr | None = self.ns.getattr(ino)
        for part in path.split("/"):
            attr = self.ns.lookup(ino, part.encode(), io=True)
            if attr is None:
                return None
            ino = attr.ino
        return attr


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def names(entries: list[tuple[bytes, Attr]]) -> list[str]:
    return sorted(name.decode() for name, _ in entries)


def test_root_lists_snapshots_dir_and_workflows(world: World) -> None:
    assert names(world.ns.readdir(ROOT_INODE)) == [".snapshots", "wf"]
    assert world.ns.readdir(SNAPSHOTS_INODE) == []


def test_workflow_lists_nodes_without_building_or_io(world: World) -> None:
    wf = world.walk("wf")
    assert wf is not None and wf.cache == CACHE_SHORT
    entries = world.ns.readdir(wf.ino)  # io=False: must not raise WouldBlock
    assert names(entries) == ["one", "two"]
    assert {attr.cache for _, attr in entries} == {CACHE_NONE}
    assert all(attr.ino for _, attr in entries)  # glibc hides d_ino == 0
    one = world.walk("wf/one")
    assert one is not None
    assert dict(world.ns.readdir(wf.ino))[b"one"] == one


def test_view_serves_snapshot_and_hides_metadata(world: World) -> None:
    root = world.walk("wf/one")
    assert root is not None
    entries = world.ns.readdir(root.ino, io=True)
    assert names(entries) == ["bin", "lib", "marker.txt", "pyvenv.cfg"]
    assert world.walk("wf/one/.envfs") is None
    assert world.walk("wf/one/nope") is None
    marker = world.walk("wf/one/marker.txt")
    assert marker is not None and marker.size == 1 and marker.cache == CACHE_LONG


def test_shared_files_are_one_inode_and_directories_are_not(world: World) -> None:
    one = world.walk("wf/one/lib/site-packages/shared.py")
    two = world.walk("wf/two/lib/site-packages/shared.py")
    by_id = world.walk(".snapshots/A/lib/site-packages/shared.py")
    assert one is not None and two is not None and by_id is not None
    assert one.ino == two.ino == by_id.ino
    same_bytes = world.walk("wf/one/lib/site-packages/copy.py")  # a copy, not a hardlink
    assert same_bytes is not None and same_bytes.ino == one.ino
    lib_one, lib_two = world.walk("wf/one/lib"), world.walk("wf/two/lib")
    pinned = world.walk("wf/two@1/lib")  # same snapshot as wf/one, another view
    assert lib_one is not None and lib_two is not None and pinned is not None
    assert len({lib_one.ino, lib_two.ino, pinned.ino}) == 3
    assert world.walk("wf/one/marker.txt") != world.walk("wf/two/marker.txt")


def test_a_local_store_is_attached_without_a_thread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INLINE_IO_ENV, "always")  # as on a local file system
    one = world.walk("wf/one")
    assert one is not None
    lib = world.ns.lookup(one.ino, b"lib")  # io=False, and no WouldBlock
    assert lib is not None and stat.S_ISDIR(lib.mode)


def test_attributes_come_from_the_manifest_and_are_the_same_everywhere(world: World) -> None:
    marker = world.walk("wf/one/marker.txt")
    assert marker is not None
    assert stat.S_ISREG(marker.mode) and stat.S_IMODE(marker.mode) == 0o444  # no write bits
    assert marker.size == 1 and marker.nlink == 1 and marker.blocks == 1
    assert marker.mtime_ns == marker.ctime_ns == SNAPSHOT_TIME_NS
    assert marker.uid == world.a.stat().st_uid
    lib, root = world.walk("wf/one/lib"), world.walk("wf/one")
    assert lib is not None and root is not None
    assert stat.S_ISDIR(lib.mode) and lib.nlink == 3  # . and .. and site-packages
    assert root.nlink == 2  # its view root is synthetic; the first lookup inside attaches it
    entries = dict(world.ns.readdir(root.ino, io=True))
    assert entries[b"bin"].nlink == 2 and entries[b"lib"].nlink == 3


def test_a_snapshot_without_a_readable_manifest_is_an_error_not_a_guess(world: World) -> None:
    (world.a / ".envfs" / "manifest.json").write_text('{"files": [{"path": "x"}]}')
    one = world.walk("wf/one")
    assert one is not None
    with pytest.raises(SnapshotUnreadable, match="envfs verify"):
        world.ns.lookup(one.ino, b"bin", io=True)
    write_manifest(world.a)  # repaired: the next access reads it again
    assert world.walk("wf/one/bin/python") is not None


def test_symlinks_keep_their_target(world: World) -> None:
    link = world.walk("wf/one/bin/python")
    assert link is not None and stat.S_ISLNK(link.mode) and link.size == len("/usr/bin/python3")
    assert world.ns.readlink(link.ino) == b"/usr/bin/python3"
    python3 = world.walk("wf/one/bin/python3")
    assert python3 is not None and world.ns.readlink(python3.ino) == b"python"
    marker = world.walk("wf/one/marker.txt")
    assert marker is not None and world.ns.readlink(marker.ino) is None


def test_cold_lookups_ask_for_a_thread_and_warm_ones_never_touch_the_disk(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INLINE_IO_ENV, "never")  # as on a network store
    wf = world.walk("wf")
    assert wf is not None
    one = world.ns.lookup(wf.ino, b"one")  # a view root answers without I/O
    assert one is not None
    with pytest.raises(WouldBlock):
        world.ns.lookup(one.ino, b"lib")  # the snapshot is not stat-ed yet
    world.walk("wf/one/lib/site-packages/shared.py")
    world.walk("wf/one/lib/site-packages/missing.py")

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("store I/O on a warm lookup")

    for name in ("stat", "lstat", "scandir", "readlink", "listdir", "open"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)
    before = world.ns.statistics()
    ino = ROOT_INODE
    for part in ("wf", "one", "lib", "site-packages", "shared.py"):
        attr = world.ns.lookup(ino, part.encode())
        assert attr is not None
        ino = attr.ino
    shared_ino = ino
    lib = world.ns.lookup(world.ns.lookup(wf.ino, b"one").ino, b"lib")  # type: ignore[union-attr]
    assert lib is not None
    site = world.ns.lookup(lib.ino, b"site-packages")
    assert site is not None
    assert world.ns.lookup(site.ino, b"missing.py") is None  # misses come from the listing
    pinned = world.walk(".snapshots/A/lib/site-packages/shared.py")  # another view of A
    assert pinned is not None and pinned.ino == shared_ino
    stats = world.ns.statistics()
    assert stats["lookups"] > before["lookups"] and stats["cold"] == before["cold"]  # all warm


def test_binding_flip_gives_a_new_root_inode_and_an_invalidation(world: World) -> None:
    before = world.walk("wf/one")
    assert before is not None and before.cache == CACHE_SHORT
    world.catalog.bindings[("wf", "one")] = ["A", "B"]
    wf = world.walk("wf")
    assert wf is not None
    assert world.ns.binding_changed("wf", "one") == [(wf.ino, b"one")]
    after = world.walk("wf/one")
    assert after is not None and after.ino != before.ino
    marker = world.walk("wf/one/marker.txt")
    assert marker is not None and marker.size == 1
    assert world.ns.getattr(before.ino) == before  # processes inside the old view keep going
    assert world.ns.binding_changed("other", "x") == [(ROOT_INODE, b"other")]


def test_pinned_and_by_id_views_are_long_lived(world: World) -> None:
    pinned = world.walk("wf/two@1")
    by_id = world.walk(".snapshots/B")
    assert pinned is not None and pinned.cache == CACHE_LONG
    assert by_id is not None and by_id.cache == CACHE_LONG
    assert world.walk("wf/two@3") is None
    assert world.walk("wf/two@x") is None
    assert world.walk("wf/@1") is None
    assert world.walk(".snapshots/C") is None  # by id only what is built
    assert world.ns.xattrs(pinned.ino) == {
        b"user.envfs.id": b"A",
        b"user.envfs.rev": b"1",
        b"user.envfs.state": b"ready",
        b"user.envfs.view": b"revision",
    }
    assert world.ns.xattrs(ROOT_INODE) == {}


def test_unknown_binding_asks_the_store_once_per_negative_ttl(world: World) -> None:
    assert world.walk("wf/ghost") is None
    assert world.walk("wf/ghost") is None
    assert world.catalog.store_calls == [("wf", "ghost")]
    wf = world.walk("wf")
    assert wf is not None
    assert world.ns.lookup(wf.ino, b"ghost") is None  # cached: no WouldBlock
    world.now += NEGATIVE_TTL + 0.1
    assert world.walk("wf/ghost") is None
    assert len(world.catalog.store_calls) == 2
    world.catalog.store[("wf", "late")] = ["B"]
    late = world.walk("wf/late/marker.txt")
    assert late is not None


def test_bad_names_are_misses(world: World) -> None:
    for path in ("nowf", ".hidden", "wf/.x", "wf/one@", "wf/a/b"):
        assert world.walk(path) is None
    assert world.ns.lookup(ROOT_INODE, b"\xff") is None
    assert world.ns.lookup(12345, b"x") is None


@pytest.mark.parametrize("rev", ["01", "+1", " 1", "1 ", "\uff11", "\u00b2", "1\n", "1.0", "0"])
def test_only_canonical_revision_numbers_name_a_revision(world: World, rev: str) -> None:
    assert world.walk("wf/two@1") is not None
    assert world.walk(f"wf/two@{rev}") is None  # no alias of @1, and no error


def test_unbuilt_binding_needs_a_build_then_serves(world: World) -> None:
    world.catalog.bindings[("wf", "lazy")] = ["C"]
    root = world.walk("wf/lazy")  # the root answers at once: lookups in "wf" never wait
    assert root is not None
    assert world.ns.xattrs(root.ino)[b"user.envfs.state"] == b"bound"
    with pytest.raises(NeedsBuild) as need:
        world.walk("wf/lazy/marker.txt")
    assert need.value.snapshot_id == "C"
    with pytest.raises(NeedsBuild):
        world.ns.readdir(root.ino, io=True)
    world.ns.note_built("C", world.c)
    assert world.ns.xattrs(root.ino)[b"user.envfs.state"] == b"ready"
    marker = world.walk("wf/lazy/marker.txt")
    assert marker is not None
    path = world.ns.file_path(marker.ino)
    assert path is not None and Path(os.fsdecode(path)).read_text() == "C"
    assert world.ns.xattrs(root.ino)[b"user.envfs.state"] == b"ready"


def test_namespace_is_safe_under_concurrent_cold_lookups(world: World) -> None:
    results: list[int] = []

    def walk() -> None:
        attr = world.walk("wf/two/lib/site-packages/shared.py")
        assert attr is not None
        results.append(attr.ino)

    threads = [threading.Thread(target=walk) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 16 and len(set(results)) == 1
    assert world.walk("wf/two/lib") == world.walk("wf/two/lib")


# -- builds ---------------------------------------------------------------------------------


def test_concurrent_first_accesses_share_one_build(world: World) -> None:
    world.catalog.build_delay = 0.3
    paths: list[Path] = []

    async def main() -> None:
        queue = BuildQueue(world.catalog)

        async def access() -> None:
            paths.append(await queue.wait_for_build("C"))

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(access)
            t0 = time.monotonic()
            await trio.sleep(0.1)  # the build (0.3 s) runs in a thread meanwhile
            assert time.monotonic() - t0 < 0.25, "the event loop waited for the build"
            running = queue.statistics()["running"]
            assert isinstance(running, list) and len(running) == 1

    trio.run(main)
    assert world.catalog.build_calls == ["C"]
    assert paths == [world.c] * 16


def test_failed_build_is_reported_backs_off_and_retries(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.catalog.fail_builds = 1
    clock = [0.0]

    async def main() -> None:
        queue = BuildQueue(world.catalog, retry_after=10.0, clock=lambda: clock[0])
        with pytest.raises(BuildFailed) as failed:
            await queue.wait_for_build("C")
        assert failed.value.errno == errno.EIO
        stats = queue.statistics()["failed"]
        assert isinstance(stats, list) and "uv said no" in stats[0]["reason"]
        with pytest.raises(BuildFailed):
            await queue.wait_for_build("C")  # inside the back-off: no new build
        assert world.catalog.build_calls == ["C"]
        clock[0] = 10.5
        assert await queue.wait_for_build("C") == world.c
        assert queue.statistics()["failed"] == []

    trio.run(main)
    assert world.catalog.build_calls == ["C", "C"]
    assert any("uv said no" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_build_errno_comes_from_the_error_and_other_ids_build_at_once(world: World) -> None:
    async def main() -> None:
        queue = BuildQueue(world.catalog, retry_after=60.0)
        with pytest.raises(NotFound) as missing:
            await queue.wait_for_build("nope")
        assert missing.value.errno == errno.ENOENT
        assert await queue.wait_for_build("C") == world.c  # another id: no back-off

    trio.run(main)
    assert world.catalog.build_calls == ["nope", "C"]


def test_a_crashing_builder_becomes_an_eio_build_failure(world: World) -> None:
    def crash(snapshot_id: str) -> Path:
        raise RuntimeError("boom")

    world.catalog.build = crash  # type: ignore[method-assign]

    async def main() -> None:
        queue = BuildQueue(world.catalog)
        with pytest.raises(BuildFailed, match="boom"):
            await queue.wait_for_build("C")

    trio.run(main)


def test_short_ids_are_served_by_fuse_and_each_user_has_its_own_lookup_budget(
    world: World,
) -> None:
    from envfs.fs.misses import STORE_LOOKUP_RATE

    sid = "ab" * 32
    world.catalog.snapshots[sid] = world.a
    snaps = SNAPSHOTS_INODE
    flooder, other = 1000, 1001
    for i in range(int(STORE_LOOKUP_RATE) + 5):  # random prefixes, as one user's loop
        assert world.ns.lookup(snaps, f"{i:012x}".encode(), io=True, uid=flooder) is None
    # the flooder's budget is spent; another user's valid short id is still found
    assert world.ns.lookup(snaps, sid[:12].encode(), io=True, uid=flooder) is None
    short = world.ns.lookup(snaps, sid[:13].encode(), io=True, uid=other)
    assert short is not None
    full = world.ns.lookup(snaps, sid.encode(), io=True, uid=other)
    assert full is not None
    for attr in (short, full):  # load both views' trees, as a first use inside them does
        assert world.ns.lookup(attr.ino, b"marker.txt", io=True) is not None
    # only the canonical name may be handed to the kernel: one mount per snapshot, not one
    # per prefix a user tries
    paths = sorted(view.path for view, _, _ in world.ns.kernel_candidates())
    assert paths == [f".snapshots/{sid}"], paths


def test_a_flood_of_missing_names_is_bounded_in_memory_and_store_lookups(world: World) -> None:
    from envfs.fs.misses import MAX_NEGATIVE, STORE_LOOKUP_RATE

    wf = world.walk("wf")
    assert wf is not None
    for i in range(3 * MAX_NEGATIVE):
        assert world.ns.lookup(wf.ino, f"missing-{i}".encode(), io=True) is None
        world.now += 0.001  # 3 * 4096 names in about 12 s
    calls = len(world.catalog.store_calls)
    assert calls <= STORE_LOOKUP_RATE * (12.3 + 1) and calls < 3 * MAX_NEGATIVE / 10
    assert len(world.ns._negative) <= MAX_NEGATIVE
    world.now += 10  # the bucket refills: a name bound meanwhile is found at once
    world.catalog.store[("wf", "late")] = ["A"]
    assert world.ns.lookup(wf.ino, b"late", io=True) is not None
