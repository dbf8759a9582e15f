"""The node-local cache: a node serves the envs it has used from its own copy, through a
NAS outage too (the store on scripts/nas-sim), and keeps the copies within a bound."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from envfs.fs.kernel import mount_table, mounts_under
from envfs.fs.vfs import Namespace
from envfs.node.cache import PARTIAL_MIN, CacheDamage, NodeCache
from envfs.node.early import EarlyTree
from envfs.node.partial import CHUNK, PIECE, PartialCopy
from envfs.store.files import Listing, ListingEntry, read_trace
from envfs.store.formats import AccessTrace, ManifestEntry
from envfs.store.layout import Store
from tests.conftest import PY, Env, make_env, reachable_by_all, seed_store
from tests.node.test_nodes import wait_for
from tests.test_e2e import Mount, py
from tests.test_nas_sim import NasSim

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def _status(env: Env) -> dict[str, object]:
    (mount,) = json.loads(env.run("status", "--json").stdout)["mounts"]
    status: dict[str, object] = mount
    return status


def _held(objects: Path, entry: ManifestEntry) -> bool:
    """Whether the node cache's ``objects/`` holds this manifest entry's content."""
    assert entry.sha256 is not None
    return (objects / entry.sha256[:2] / f"{entry.sha256}.{entry.mode & 0o7777:o}").exists()


def _copies(env: Env) -> int:
    cache = _status(env)["cache"]
    assert isinstance(cache, dict)
    return int(cache["node_cache_copies"])


def _trace(snap: Path) -> AccessTrace:
    """A snapshot directory's access trace (it has one)."""
    trace = read_trace(os.fsencode(snap))
    assert trace is not None
    return trace


def _ahead(snap: Path) -> tuple[list[str], set[str]]:
    """The files a fresh node copies whole ahead of a job (the trace's, but for big
    libraries of which it notes the parts touched), and those big libraries (those parts
    only)."""
    trace = json.loads((snap / ".envfs/trace.json").read_text())
    parts = {rel for rel in trace["ranges"] if (snap / rel).stat().st_size >= PARTIAL_MIN}
    return [rel for rel in trace["files"] if rel not in parts], parts


@pytest.fixture
def nas_node(tmp_path: Path, wheelhouse: Path) -> Iterator[tuple[Env, NasSim, list[Mount]]]:
    """A node whose store is on nas-sim; every daemon and the NAS are stopped after."""
    backing, nas_mnt = tmp_path / "backing", tmp_path / "nas"
    backing.mkdir()
    nas_mnt.mkdir()
    seed_store(backing / "store")  # the captured interpreter, put there behind the NAS's back
    nas = NasSim(backing, nas_mnt, "--latency-ms", "0")
    env = make_env(tmp_path / "node", wheelhouse, seed=False)
    env.vars["ENVFS_STORE"] = str(nas_mnt / "store")
    env.store = nas_mnt / "store"
    env.vars["XDG_RUNTIME_DIR"] = str(env.root / "run")
    mounts: list[Mount] = []
    try:
        yield env, nas, mounts
        for m in reversed(mounts):
            m.stop()
        for m in mounts:
            m.check_clean_exit()
        nas.stop()
    finally:
        for m in mounts:
            m.stop()
        nas.cleanup()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fuse-only"])
def test_used_envs_keep_working_through_a_store_outage(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path, kernel: bool
) -> None:
    env, nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, *([] if kernel else ["--no-kernel-mounts"])))
    assert py(mnt, "wf/n", "import extra_a").returncode == 0  # first use: from the NAS
    wait_for(lambda: _copies(env) == 1, 60, "the node's copy")
    copy = env.index / "cache" / "snapshots" / env.show("wf/n")["snapshot_id"]
    assert (copy / "lib/python3.12/site-packages/base_lib/data.py").is_file()
    if kernel:  # the kernel serves the node's copy, not the NAS
        wait_for(lambda: mnt / "wf/n@1" in mounts_under(mnt), 10, "the kernel mount")
        module = mnt / "wf/n@1/lib/python3.12/site-packages/extra_a/__init__.py"
        assert os.stat(module).st_dev == os.stat(env.index).st_dev

    nas.signal(signal.SIGUSR1)  # outage: every NAS request fails with EIO
    try:
        wait_for(lambda: not os.path.exists(env.store / "envfs.toml"), 5, "the outage")  # EIO
        # modules never imported before, from the env and its standard library
        out = py(mnt, "wf/n", "import base_lib.data, email.mime.text, sqlite3; print('ok')")
        assert out.stdout.strip() == "ok", out.stderr
    finally:
        nas.signal(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(env.store / "envfs.toml"), 5, "the end of the outage")


def test_a_fresh_node_copies_each_file_it_reads_whole_once_and_serves_it_from_there(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """Not a page at a time from the NAS, and not the whole env first: a file is copied
    into the node cache on its first read (checked), then served from there; with
    `--fill-rate off` nothing else is copied. A store file that does not match its
    manifest is not copied: it is served from the store, as before, and logged."""
    env, nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    sid = env.show("wf/n")["snapshot_id"]
    site = "lib/python3.12/site-packages"
    manifest = Store(env.store).read_manifest(sid)
    entries = {e.path: e for e in manifest.files if e.type == "file"}
    snap = tmp_path / "backing/store/snapshots" / sid
    backing = snap / site / "base_lib/data.py"
    os.chmod(backing, 0o644)
    with open(backing, "r+b") as f:  # behind the NAS's back: a flipped byte
        f.write(b"#")
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--no-kernel-mounts", "--fill-rate", "off"))
    objects = env.index / "cache" / "objects"

    def cached(rel: str) -> bool:
        return _held(objects, entries[rel])

    meta = f"{site}/extra_a-1.0.dist-info/METADATA"  # in no trace: read on demand
    assert "METADATA" in os.listdir(mnt / "wf/n" / site / "extra_a-1.0.dist-info")
    wait_for(lambda: "prefetched" in mounts[0].log(), 30, "the build's trace copied")
    assert not cached(meta)
    read = nas.counts().get("read_bytes", 0)
    assert (mnt / "wf/n" / meta).read_bytes() == (snap / meta).read_bytes()
    assert cached(meta)
    assert not cached(f"{site}/extra_a-1.0.dist-info/RECORD")  # not read: not copied
    read_after = nas.counts().get("read_bytes", 0)
    assert entries[meta].size <= read_after - read < entries[meta].size + 65536
    status = _status(env)["cache"]
    assert isinstance(status, dict)
    assert status["node_cache_fetched_files"] >= 1 and status["node_cache_copies"] == 0
    damaged = (mnt / "wf/n" / site / "base_lib/data.py").read_bytes()
    assert damaged.startswith(b"#") and not cached(f"{site}/base_lib/data.py")
    assert (
        "base_lib/data.py" in mounts[0].log() and "does not match its manifest" in mounts[0].log()
    )
    assert _copies(env) == 0


def test_a_fresh_node_copies_what_the_build_traced_as_soon_as_the_env_is_first_used(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """The build's access trace is a fresh node's head start: the first look at the env
    copies the files it names into the node cache, before the job reads them."""
    env, nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    sid = env.show("wf/n")["snapshot_id"]
    snap = tmp_path / "backing/store/snapshots" / sid
    traced, heads = _ahead(snap)
    assert len({os.path.dirname(rel) for rel in traced}) > 3
    assert heads  # libpython: the parts touched only, the rest with the whole copy (off here)
    manifest = {e.path: e for e in Store(env.store).read_manifest(sid).files}
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--no-kernel-mounts", "--fill-rate", "off"))
    objects = env.index / "cache" / "objects"

    def cached(rel: str) -> bool:
        return _held(objects, manifest[rel])

    assert not any(cached(rel) for rel in traced)
    opened = nas.counts().get("opendir", 0)
    os.stat(mnt / "wf/n/bin")  # a first look: nothing read yet
    wait_for(lambda: all(cached(rel) for rel in traced), 30, "the traced files on the node")
    wait_for(lambda: "prefetched" in mounts[0].log(), 30, "the prefetch's end")
    assert not any(cached(rel) for rel in heads)
    # files copied relative to their directories, which are never opened on the NAS
    assert nas.counts().get("opendir", 0) == opened
    assert not cached("lib/python3.12/site-packages/extra_a-1.0.dist-info/RECORD")
    assert py(mnt, "wf/n", "import extra_a").returncode == 0
    assert "prefetched" in mounts[0].log()


def test_a_fresh_node_reads_the_small_traced_files_as_packs_shared_by_envs(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """The build packs the small files its trace names, one pack per package (or standard
    library directory), pooled: envs with the same files share one inode. A fresh node
    reads the packs, not the files: far fewer NAS opens than traced files."""
    env, nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    env.run("build", "wf/m", "extra-a==1.0", "extra-b==2.0", "--python", PY)
    sid, other = env.show("wf/n")["snapshot_id"], env.show("wf/m")["snapshot_id"]
    snaps = tmp_path / "backing/store/snapshots"
    packs = json.loads((snaps / sid / ".envfs/packs.json").read_text())["packs"]
    theirs = json.loads((snaps / other / ".envfs/packs.json").read_text())["packs"]
    assert packs and any(m["path"].endswith(".pyc") for p in packs for m in p["members"])
    shared = {p["sha256"] for p in packs} & {p["sha256"] for p in theirs}
    assert shared
    one = next(iter(shared))
    a, b = (snaps / s / f".envfs/packs/{one}.pack" for s in (sid, other))
    assert os.stat(a).st_ino == os.stat(b).st_ino  # one inode (a pool object)
    assert hashlib.sha256(a.read_bytes()).hexdigest() == one
    traced, heads = _ahead(snaps / sid)
    packed = {m["path"] for p in packs for m in p["members"]}
    manifest = {e.path: e for e in Store(env.store).read_manifest(sid).files}
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--no-kernel-mounts", "--fill-rate", "off"))
    objects = env.index / "cache" / "objects"
    opens = nas.counts().get("open", 0)
    os.stat(mnt / "wf/n/bin")  # a first look
    wait_for(lambda: all(_held(objects, manifest[rel]) for rel in traced), 30, "traced files")
    files_opened = nas.counts().get("open", 0) - opens
    assert len(packed) > len(packs) + 10  # (packs hold many files each)
    # each file not packed, each pack, each library copied in part, the manifest, trace, index
    most = len(traced) - len(packed) + len(packs) + len(heads) + 3
    assert files_opened <= most, (files_opened, len(traced))
    assert py(mnt, "wf/n", "import extra_a").returncode == 0


def test_a_damaged_pack_is_named_by_verify_and_its_files_come_one_by_one(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    env, _nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    sid = env.show("wf/n")["snapshot_id"]
    snap = tmp_path / "backing/store/snapshots" / sid
    packs = json.loads((snap / ".envfs/packs.json").read_text())["packs"]
    victim = max(packs, key=lambda p: len(p["members"]))
    path = snap / f".envfs/packs/{victim['sha256']}.pack"
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # one flipped byte in the first member
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    got = env.run("verify", check=False)
    assert got.returncode != 0 and f"packs/{victim['sha256']}.pack" in got.stdout + got.stderr
    manifest = {e.path: e for e in Store(env.store).read_manifest(sid).files}
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--no-kernel-mounts", "--fill-rate", "off"))
    objects = env.index / "cache" / "objects"
    traced, _ = _ahead(snap)
    os.stat(mnt / "wf/n/bin")  # a first look: the prefetch
    wait_for(lambda: "prefetched" in mounts[0].log(), 30, "the prefetch")
    assert "does not match its manifest" in mounts[0].log()  # the damaged member, skipped
    assert all(_held(objects, manifest[rel]) for rel in traced)  # from its own file instead
    for obj in (o for o in objects.rglob("*") if o.is_file()):  # each one what it says
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name.split(".")[0]
    member = victim["members"][0]["path"]
    assert (mnt / "wf/n" / member).read_bytes() == (snap / member).read_bytes()


def test_the_cache_is_bounded_and_evicts_what_is_not_in_use(local: Env, tmp_path: Path) -> None:
    ids = []
    for i, pkg in enumerate(["extra-a==1.0", "extra-b==2.0", "tool-pkg==0.1"]):
        local.run("build", f"wf/c{i}", pkg, "--python", PY)
        ids.append(local.show(f"wf/c{i}")["snapshot_id"])
    store = Store(local.store)
    unbounded = NodeCache(tmp_path / "probe")
    unbounded.fill(ids[0], store.snapshot_dir(ids[0]))
    one = unbounded.size()  # an env: mostly the interpreter, which every env shares

    cache = NodeCache(tmp_path / "cache", max_bytes=one)  # room for one env and no more
    for sid in ids:
        cache.fill(sid, store.snapshot_dir(sid))
        cache.evict(in_use={ids[0], sid})  # the first one stays in use all along
    assert cache.path(ids[0]) is not None  # in use: kept however old
    assert cache.path(ids[1]) is None  # least recently used, not in use: evicted
    assert cache.path(ids[2]) is not None  # in use (just made)
    shared = cache.path(ids[0]) / "bin/python3.12"  # type: ignore[operator]
    assert os.stat(shared).st_nlink == 3  # pool + two copies: one inode per content


def test_a_copy_is_checked_against_the_manifest(local: Env, tmp_path: Path) -> None:
    local.run("build", "wf/d", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/d")["snapshot_id"]
    victim = local.store / "snapshots" / sid / "lib/python3.12/site-packages/base_lib/data.py"
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:  # one flipped byte in the store
        f.write(b"#")
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(CacheDamage, match="does not match its manifest"):
        cache.fill(sid, local.store / "snapshots" / sid)
    assert cache.path(sid) is None and os.listdir(tmp_path / "cache" / "staging") == []


def test_a_whole_copy_waits_while_a_job_reads_the_env_in_but_not_forever(
    local: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background copy gives the NAS to the job: it pauses while files of envs not
    copied whole are opened (or read in), and goes on regardless once its patience is out."""
    import envfs.node.cache as node_cache

    local.run("build", "wf/q", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/q")["snapshot_id"]
    source = Store(local.store).snapshot_dir(sid)
    monkeypatch.setattr(node_cache, "QUIET", 0.5)

    def fill_while_busy(cache: NodeCache, busy_for: float) -> tuple[float, float]:
        """(seconds the fill took, seconds the job kept opening files)"""
        done: list[float] = []
        t0 = time.monotonic()

        def fill() -> None:
            cache.fill(sid, source)
            done.append(time.monotonic() - t0)

        thread = threading.Thread(target=fill)
        cache.opened()
        thread.start()
        while time.monotonic() - t0 < busy_for and not done:
            cache.opened()  # a job opening files, every 0.1 s
            time.sleep(0.1)
        busy = time.monotonic() - t0
        thread.join(60)
        assert done and cache.path(sid) is not None
        return done[0], busy

    took, busy = fill_while_busy(NodeCache(tmp_path / "patient"), busy_for=2.0)
    assert took >= busy + 0.4, (took, busy)  # nothing copied until the job quietened
    monkeypatch.setattr(node_cache, "PATIENCE", 1.0)
    took, busy = fill_while_busy(NodeCache(tmp_path / "impatient"), busy_for=20.0)
    assert took < 10 and busy < 19, (took, busy)  # done while the job still opened files


def test_a_big_file_is_copied_in_ranges_and_checked_whole(tmp_path: Path) -> None:
    """Files past 8 MB are read in ranges at once (an interpreter, a BLAS library): the
    copy is the file, and one changed byte anywhere is refused."""
    import hashlib

    from envfs.store.files import ListingEntry

    data = os.urandom(9 << 20) + b"tail"
    src = tmp_path / "big.so"
    src.write_bytes(data)
    entry = ListingEntry("file", 0o100755, len(data), hashlib.sha256(data).hexdigest(), None)
    cache = NodeCache(tmp_path / "cache")
    copy = cache.fetch(entry, os.fsencode(src))
    assert copy.read_bytes() == data and cache.fetched_bytes == len(data)
    assert cache.fetch(entry, b"/nonexistent/big.so") == copy  # held: the store not asked
    damaged = bytearray(data)
    damaged[5 << 20] ^= 1
    src.write_bytes(bytes(damaged))
    other = entry._replace(mode=0o100644)  # another object, the same content claimed
    with pytest.raises(CacheDamage):
        cache.fetch(other, os.fsencode(src))
    assert not any(p.name.startswith(".") for p in copy.parent.iterdir())  # no leftovers


def test_a_bad_cache_size_is_one_line(local: Env, tmp_path: Path) -> None:
    out = local.run("mount", str(tmp_path / "m"), "--cache-size", "lots", check=False)
    assert out.returncode == 3 and "bad size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert subprocess.run(["mountpoint", "-q", str(tmp_path / "m")]).returncode != 0


def _big(tmp_path: Path, size: int = 5 * CHUNK + 123) -> tuple[bytes, Path, ListingEntry]:
    import hashlib

    data = os.urandom(size)
    src = tmp_path / "store-big.so"
    src.write_bytes(data)
    return data, src, ListingEntry("file", 0o100755, size, hashlib.sha256(data).hexdigest(), None)


def _pieces_fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The runs of pieces (first, stop) the copies fetch, one per read of the store."""
    fetched: list[tuple[int, int]] = []
    fetch = PartialCopy._fetch

    def counted(self: PartialCopy, first: int, stop: int) -> None:
        fetched.append((first, stop))
        fetch(self, first, stop)

    monkeypatch.setattr(PartialCopy, "_fetch", counted)
    return fetched


def test_a_big_file_is_read_by_the_piece_then_becomes_the_object_once_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's read of a big file waits only for the pieces it covers (a shared library
    is mapped and read in part); the whole copy fetches the rest and checks it."""
    data, src, entry = _big(tmp_path)
    fetched = _pieces_fetched(monkeypatch)
    cache = NodeCache(tmp_path / "cache")
    source = os.fsencode(src)

    def blocks() -> list[int]:
        return sorted(a * PIECE // CHUNK for a, _ in fetched)

    off = 3 * CHUNK + 10
    assert cache.read_range(entry, source, off, 4096) == data[off : off + 4096]
    assert blocks() == [3] and cache.object_path(entry) is None
    off = 2 * CHUNK - 100  # across two blocks, each fetched in one read
    assert cache.read_range(entry, source, off, 200) == data[off : off + 200]
    assert blocks() == [1, 2, 3]
    assert cache.read_range(entry, source, len(data) - 10, 4096) == data[-10:]  # the end
    staged = list((tmp_path / "cache" / "staging").iterdir())
    assert len(staged) == 1 and staged[0].stat().st_blocks * 512 <= 3 * CHUNK + (1 << 20)

    # many readers at once: each piece is fetched once, every byte right
    import random
    from concurrent.futures import ThreadPoolExecutor

    offsets = [random.randrange(len(data)) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda o: cache.read_range(entry, source, o, 65536), offsets))
    whole = cache.object_path(entry)
    for o, piece in zip(offsets, got, strict=True):
        assert piece is None or piece == data[o : o + 65536]
    pieces = [i for a, b in fetched for i in range(a, b)]
    assert len(pieces) == len(set(pieces))  # none twice
    copy = cache.fetch(entry, source)  # the whole copy: the rest, then checked
    pieces = [i for a, b in fetched for i in range(a, b)]
    assert copy.read_bytes() == data and sorted(pieces) == list(range(-(-len(data) // PIECE)))
    assert whole is None or whole == copy
    assert cache.read_range(entry, source, 0, 10) is None  # held: read the object
    assert os.stat(copy).st_mode & 0o777 == 0o555
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


def test_the_object_directories_are_made_when_the_cache_is_opened(tmp_path: Path) -> None:
    """objects/00..ff exist from the mount on: a fresh node's first files are not slowed by
    making their directories; a cache opened again keeps its objects."""
    cache = NodeCache(tmp_path / "cache")
    assert sorted(os.listdir(cache.objects)) == [f"{i:02x}" for i in range(256)]
    data = b"kept\n"
    (tmp_path / "f").write_bytes(data)
    entry = ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)
    held = cache.fetch(entry, os.fsencode(tmp_path / "f"))
    assert NodeCache(tmp_path / "cache").object_path(entry) == held


def test_a_big_files_pieces_here_are_read_without_a_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What FUSE reads inline (on its event loop): bytes whose pieces are here; None for a
    part not here (read in a thread then), and nothing is fetched for it."""
    data, src, entry = _big(tmp_path)
    fetched = _pieces_fetched(monkeypatch)
    cache = NodeCache(tmp_path / "cache")
    source = os.fsencode(src)
    assert cache.read_here(entry, 10, 100) is None  # no copy under way yet
    assert cache.read_range(entry, source, 10, 100) == data[10:110]
    runs = list(fetched)
    assert cache.read_here(entry, CHUNK - 50, 50) == data[CHUNK - 50 : CHUNK]
    assert cache.read_here(entry, CHUNK - 50, 100) is None  # half of it in the next block
    assert cache.read_here(entry, 3 * CHUNK, 10) is None and fetched == runs
    cache.fetch(entry, source)  # whole: the object is read from then on
    assert cache.read_here(entry, 10, 100) is None


def test_a_big_file_whose_pieces_do_not_match_is_refused_once_whole(tmp_path: Path) -> None:
    data, src, entry = _big(tmp_path)
    cache = NodeCache(tmp_path / "cache")
    source = os.fsencode(src)
    claimed = entry._replace(sha256="0" * 64)  # the manifest says otherwise
    assert cache.read_range(claimed, source, 0, 100) == data[:100]  # the store's bytes
    with pytest.raises(CacheDamage):
        cache.fetch(claimed, source)
    with pytest.raises(CacheDamage):  # refused from then on: served from the store
        cache.read_range(claimed, source, 0, 100)
    assert cache.object_path(claimed) is None
    assert list((tmp_path / "cache" / "staging").iterdir()) == []
    short = entry._replace(size=len(data) + CHUNK)  # the store's file is shorter
    with pytest.raises(CacheDamage):
        cache.fetch(short._replace(mode=0o100644), source)


def test_a_fresh_node_reads_a_big_file_by_the_piece_through_the_mount(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """Through the kernel and the NAS: a read of a few pages of a 20 MB file costs the
    NAS the pieces they lie in, not the file; the file reads right whole after."""
    from tests.wheels import make_wheel

    env, nas, mounts = nas_node
    blob = os.urandom(10 << 20).hex()  # 20 MB, in no trace: the import does not read it
    wheels = tmp_path / "bigwheels"
    wheels.mkdir()
    make_wheel(
        wheels, "big-blob", "1.0", modules={"big_blob/__init__.py": "", "big_blob/blob.txt": blob}
    )
    env.vars["UV_FIND_LINKS"] = str(wheels)
    env.run("build", "wf/big", "big-blob==1.0", "--python", PY)
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--no-kernel-mounts", "--fill-rate", "off"))
    path = mnt / "wf/big/lib/python3.12/site-packages/big_blob/blob.txt"
    os.stat(mnt / "wf/big/bin")  # the first look starts the trace's prefetch: let it end
    wait_for(lambda: "prefetched" in mounts[0].log(), 30, "the build's trace copied")
    before = nas.counts().get("read_bytes", 0)
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 4096, 12 << 20) == blob.encode()[12 << 20 : (12 << 20) + 4096]
    read = nas.counts().get("read_bytes", 0) - before
    assert read <= 2 * CHUNK + (1 << 20), read  # a piece or two, not 20 MB
    assert path.read_bytes() == blob.encode()
    sha = hashlib.sha256(blob.encode()).hexdigest()
    assert any((env.index / "cache" / "objects" / sha[:2]).glob(f"{sha}.*"))  # whole, checked


def test_the_prefetch_leaves_huge_traced_files_to_be_read_by_the_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traced library past WHOLE_MAX is not copied whole ahead of the job (its pieces
    come as read); the smaller traced files are."""
    import hashlib

    from envfs.fs import prefetch

    monkeypatch.setattr(prefetch, "WHOLE_MAX", 1 << 20)
    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    small, huge = b"x" * 1000, os.urandom(2 << 20)
    (snap / "small.py").write_bytes(small)
    (snap / "huge.so").write_bytes(huge)
    (snap / ".envfs/trace.json").write_text(json.dumps({"files": ["huge.so", "small.py"]}))

    def entry(data: bytes) -> ListingEntry:
        return ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)

    listing = {b"": {b"small.py": entry(small), b"huge.so": entry(huge)}}
    cache = NodeCache(tmp_path / "cache")
    assert prefetch.copy_traced(cache, os.fsencode(snap), listing, _trace(snap)) == 1
    assert cache.object_path(entry(small)) is not None
    assert cache.object_path(entry(huge)) is None


def test_the_prefetch_copies_the_parts_of_a_big_library_the_import_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of a traced big library, the pieces of the ranges the trace says its import touched
    are copied ahead of the job (a run of them in one read), and served from the node
    after; the rest comes with the whole copy, which checks the whole. So too past
    WHOLE_MAX (a library not copied whole ahead, as torch's)."""
    import hashlib

    from envfs.fs import prefetch

    monkeypatch.setattr(prefetch, "WHOLE_MAX", 1 << 20)
    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    lib = os.urandom(3 * CHUNK)
    (snap / "libbig.so").write_bytes(lib)
    touched = [(0, 4096), (PIECE + 10, 3 * PIECE - 10), (2 * CHUNK + 5, 2 * CHUNK + 6)]
    trace = {"files": ["libbig.so"], "ranges": {"libbig.so": touched}}
    (snap / ".envfs/trace.json").write_text(json.dumps(trace))
    entry = ListingEntry("file", 0o100755, len(lib), hashlib.sha256(lib).hexdigest(), None)
    cache = NodeCache(tmp_path / "cache")
    source = os.fsencode(snap / "libbig.so")
    fetched = _pieces_fetched(monkeypatch)
    assert (
        prefetch.copy_traced(cache, os.fsencode(snap), {b"": {b"libbig.so": entry}}, _trace(snap))
        == 1
    )
    assert cache.object_path(entry) is None  # not whole: 4 pieces of it are here
    block = 2 * CHUNK // PIECE
    assert sorted(fetched) == [(0, 3), (block, block + 1)]  # pieces 0-2 in one read
    (staged,) = cache.staging.iterdir()
    assert staged.stat().st_blocks * 512 == 4 * PIECE, staged.stat()
    fetched.clear()
    held = cache.fetch(entry, source)  # the whole copy: the rest only
    assert held.read_bytes() == lib and cache.object_path(entry) == held
    assert sum(b - a for a, b in fetched) * PIECE == len(lib) - 4 * PIECE, fetched


def test_the_prefetch_keeps_a_bounded_number_of_bytes_under_way_in_trace_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies start in trace order, and only while the bytes under way leave room: the
    files the job needs first are not slowed by many later ones at once."""
    import hashlib

    from envfs.fs import prefetch

    monkeypatch.setattr(prefetch, "IN_FLIGHT", 2500)
    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    names = [f"m{i:02d}.py" for i in range(12)]
    listing: dict[bytes, dict[bytes, ListingEntry]] = {b"": {}}
    for i, name in enumerate(names):
        data = bytes([i]) * 1000
        (snap / name).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        listing[b""][name.encode()] = ListingEntry("file", 0o100644, 1000, sha, None)
    order = list(reversed(names))
    (snap / ".envfs/trace.json").write_text(json.dumps({"files": order}))
    started: list[str] = []
    busy, most = [0], [0]
    lock = threading.Lock()
    fetch = NodeCache.fetch

    def slow(self: NodeCache, entry: ListingEntry, source: bytes, dirs: object = None) -> Path:
        with lock:
            started.append(os.path.basename(os.fsdecode(source)))
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.05)
        with lock:
            busy[0] -= 1
        return fetch(self, entry, source)

    monkeypatch.setattr(NodeCache, "fetch", slow)
    cache = NodeCache(tmp_path / "cache")
    assert prefetch.copy_traced(cache, os.fsencode(snap), listing, _trace(snap)) == len(names)
    assert started == order and most[0] == 2


def _fstype(path: Path) -> str | None:
    """The type of the file system mounted at ``path`` (the topmost), or None."""
    point = os.fsencode(path)
    found = [m.fstype for m in mount_table() if m.point == point]
    return found[-1] if found else None


def _job(mnt: Path) -> subprocess.Popen[str]:
    """A process started from ``wf/n`` that waits for a line before it imports extra_a."""
    code = "import sys; print('up', flush=True); sys.stdin.readline(); import extra_a"
    job = subprocess.Popen(
        [mnt / "wf/n/bin/python", "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert job.stdout is not None and job.stdout.readline() == "up\n"
    return job


def _finish(job: subprocess.Popen[str]) -> None:
    _, err = job.communicate("go\n", timeout=60)
    assert job.returncode == 0, err


def test_the_prefetch_links_a_traced_big_library_the_node_holds_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traced big library the node holds already (a sibling env's) is linked into the
    early tree as the prefetch comes to it, not fetched again by the piece and left to
    FUSE: the tree no longer links what the node holds when it is made."""
    from envfs.fs import prefetch

    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    lib = os.urandom(PARTIAL_MIN + PIECE)
    (snap / "libbig.so").write_bytes(lib)
    trace = {"files": ["libbig.so"], "ranges": {"libbig.so": [(0, 4096)]}}
    (snap / ".envfs/trace.json").write_text(json.dumps(trace))
    entry = ListingEntry("file", 0o100755, len(lib), hashlib.sha256(lib).hexdigest(), None)
    listing = {b"": {b"libbig.so": entry}}
    cache = NodeCache(tmp_path / "cache")
    cache.fetch(entry, os.fsencode(snap / "libbig.so"))
    tree = EarlyTree.make(cache, "s" * 64, listing, [b"libbig.so"])
    assert tree.linked == 0  # held, but linked by the prefetch, in the trace's order
    fetched = _pieces_fetched(monkeypatch)
    assert prefetch.copy_traced(cache, os.fsencode(snap), listing, _trace(snap), tree) == 1
    assert (tree.path / "libbig.so").read_bytes() == lib and tree.linked == 1
    assert fetched == [] and not list(cache.staging.iterdir())
    tree.remove()


def test_a_fresh_node_kernel_serves_the_files_it_holds_before_its_whole_copy(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """Until a fresh node holds an env whole, an overlay of what it holds (its early tree,
    the traced files linked in as they land) over the FUSE view lets the kernel serve those
    files; the others still come through FUSE, right, and their names from the image of
    the snapshot's names (no FUSE request for a stat, a listing or a missing name). A job
    running from the view while the overlay arrives goes on; new processes run through
    it."""
    env, _nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    snap = tmp_path / "backing/store/snapshots" / env.show("wf/n")["snapshot_id"]
    traced = json.loads((snap / ".envfs/trace.json").read_text())["files"]
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--fill-rate", "off"))
    view = mnt / "wf/n@1"
    job = _job(mnt)  # running from the view: it does not keep the overlay out
    try:
        wait_for(lambda: _fstype(view) == "overlay", 15, "an overlay on the view")
        wait_for(lambda: "prefetched" in mounts[0].log(), 30, "the prefetch")
        early = "(kernel, early)"
        wait_for(lambda: early in env.run("status").stdout, 5, "the status saying so")
        site = "lib/python3.12/site-packages"
        mine = [rel for rel in traced if rel.startswith(f"{site}/extra_a/")]
        assert mine, traced

        def counted(what: str) -> int:
            cache = _status(env)["cache"]
            assert isinstance(cache, dict)
            return int(cache[what])

        def opens() -> int:
            return counted("opens")

        assert "names from its image" in mounts[0].log()
        time.sleep(1.5)  # the status file is rewritten every second
        before, lookups = opens(), counted("lookups")
        dist = f"{site}/extra_a-1.0.dist-info"  # not traced: the node lacks its files
        assert sorted(os.listdir(view / dist)) == sorted(os.listdir(snap / dist))
        untraced = [
            os.path.relpath(os.path.join(top, name), snap)
            for top, _dirs, files in os.walk(snap / "lib")
            for name in files
        ]
        untraced = [rel for rel in untraced if rel not in traced]
        assert len(untraced) > 100
        for rel in untraced:
            assert os.lstat(view / rel).st_size == os.lstat(snap / rel).st_size
        with pytest.raises(FileNotFoundError):
            os.stat(view / site / "extra_a/__init__.so")
        time.sleep(1.5)
        assert counted("lookups") - lookups <= 2  # the image answered: not one per name
        for rel in mine:  # held: the kernel serves them, FUSE is not asked to open them
            assert (view / rel).read_bytes() == (snap / rel).read_bytes()
        time.sleep(1.5)
        assert opens() == before
        record = f"{site}/extra_a-1.0.dist-info/RECORD"  # not traced: through FUSE
        assert record not in traced
        assert (view / record).read_bytes() == (snap / record).read_bytes()
        wait_for(lambda: opens() > before, 5, "FUSE opening the file the node lacks")
        assert py(mnt, "wf/n", "import extra_a").returncode == 0
        if os.geteuid() == 0:  # and as nobody (the tree's directory on the node is root's)
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            run = [*nobody, str(mnt / "wf/n/bin/python"), "-c", "import extra_a"]
            with reachable_by_all(mnt):
                out = subprocess.run(run, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
        _finish(job)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert _fstype(view) == "overlay"  # no whole copy (--fill-rate off): it stays
    assert os.listdir(env.index / "cache/early")
    mounts[0].stop()
    assert not os.listdir(env.index / "cache/early")  # the daemon took its tree with it


def test_a_fresh_nodes_whole_copy_replaces_its_early_overlay(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """Once the whole copy is in, a bind of it replaces the early overlay; a process still
    running from the overlay goes on."""
    env, _nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt))
    view = mnt / "wf/n@1"
    job = _job(mnt)
    try:
        wait_for(lambda: _fstype(view) == "overlay", 15, "an overlay on the view")
        wait_for(lambda: _copies(env) == 1, 60, "the whole copy")
        wait_for(lambda: _fstype(view) not in (None, "overlay"), 15, "a bind of the copy")
        assert [m.fstype for m in mount_table()].count("overlay") == 0  # detached, not stacked
        wait_for(lambda: "wf/n@1 -> " in env.run("status").stdout, 5, "the status")
        wait_for(lambda: "early" not in env.run("status").stdout, 5, "the status saying so")
        _finish(job)
        assert py(mnt, "wf/n", "import extra_a").returncode == 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_an_early_tree_holds_the_way_to_what_the_node_has_and_will_have(tmp_path: Path) -> None:
    """The directories on the way to the files coming (the trace's), with their symlinks;
    no other directory (each is an inode written while the job waits: the overlay serves it
    from FUSE); no file until it is linked in (the prefetch links each traced file as it
    lands or is found held), one it lacks not even then. Without a trace, a link to each
    file the node holds (from any env) at once, and the directories on the way to those."""

    def entry(data: bytes, mode: int = 0o100644) -> ListingEntry:
        return ListingEntry("file", mode, len(data), hashlib.sha256(data).hexdigest(), None)

    held, lacked, later = b"held\n", b"lacked\n", b"later\n"
    listing = {
        b"": {
            b"lib": ListingEntry("dir", 0o40755, 0, None, None),
            b"lib64": ListingEntry("symlink", 0o120777, 3, None, "lib"),
            b"share": ListingEntry("dir", 0o40755, 0, None, None),
            b".envfs": ListingEntry("dir", 0o40755, 0, None, None),
        },
        b"lib": {
            b"a.py": entry(held),
            b"b.py": entry(lacked),
            b"sub": ListingEntry("dir", 0o40700, 0, None, None),
            b"other": ListingEntry("dir", 0o40755, 0, None, None),
        },
        b"lib/sub": {
            b"c.py": entry(later),
            b"s": ListingEntry("symlink", 0o120777, 4, None, "c.py"),
        },
        b"lib/other": {b"d.py": entry(later)},
        b"share": {b"t": ListingEntry("symlink", 0o120777, 4, None, "../lib")},
        b".envfs": {},
    }
    cache = NodeCache(tmp_path / "cache")
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.py").write_bytes(held)
    (store / "b.py").write_bytes(lacked)
    cache.fetch(entry(held), os.fsencode(store / "a.py"))
    umask = os.umask(0o077)  # a daemon's umask does not reach the modes users see
    try:
        tree = EarlyTree.make(cache, "s" * 64, listing, [b"lib/sub/c.py", b"lib/gone/q.py"])
    finally:
        os.umask(umask)
    root = tree.path
    assert not (root / "lib/a.py").exists() and tree.linked == 0  # held, not traced: not yet
    assert tree.link(b"lib/a.py", entry(held)) and (root / "lib/a.py").read_bytes() == held
    assert os.stat(root / "lib/a.py").st_ino == os.stat(cache.object_path(entry(held)) or "").st_ino
    assert not (root / "lib/b.py").exists()
    assert os.readlink(root / "lib64") == "lib"
    assert os.readlink(root / "lib/sub/s") == "c.py"
    assert os.stat(root / "lib/sub").st_mode & 0o7777 == 0o500  # never writable
    assert os.stat(root / "lib").st_mode & 0o7777 == 0o555
    assert os.stat(root).st_mode & 0o7777 == 0o555
    assert not (root / "lib/other").exists() and not (root / "share").exists()  # not needed
    assert not (root / "lib/gone").exists()  # a traced path the listing does not have
    assert not (root / ".envfs").exists()  # FUSE views hide it
    assert not tree.link(b"lib/b.py", entry(lacked))  # the node lacks it still
    cache.fetch(entry(lacked), os.fsencode(store / "b.py"))
    assert tree.link(b"lib/b.py", entry(lacked)) and (root / "lib/b.py").read_bytes() == lacked
    assert not tree.link(b"lib/b.py", entry(lacked))  # once
    tree.remove()
    assert not root.exists()
    bare = EarlyTree.make(cache, "s" * 64, listing)  # no trace: what the node holds, at once
    assert (bare.path / "lib/a.py").read_bytes() == held and bare.linked == 2
    assert (bare.path / "lib/b.py").read_bytes() == lacked
    assert not (bare.path / "lib/sub").exists()  # nothing held there
    bare.remove()


def _remote(snap: Path, listing: Listing) -> Namespace:
    """A namespace to hand `prefetch_snapshot` directly: it serves ``snap`` (with
    ``listing``) from a NAS, which is the one thing the prefetch asks of it."""

    class Remote:
        def remote_tree(self, _sid: str) -> tuple[bytes, Listing, tuple[int, int]]:
            return os.fsencode(snap), listing, (0, 0)

    return cast(Namespace, Remote())


def test_a_failing_prefetch_or_early_tree_leaves_the_daemon_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The prefetch and the early tree are a head start: an unexpected error in either (a
    bug) is logged with its traceback and the prefetch task ends, instead of ending the
    daemon's nursery and every mount with it (as a TypeError in the copy once did)."""
    import trio

    from envfs.fs import prefetch

    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    (snap / ".envfs/trace.json").write_text(json.dumps({"files": ["a.py"]}))
    entry = ListingEntry("file", 0o100644, 2, "0" * 64, None)
    listing = {b"": {b"a.py": entry}}

    def broken(*_args: object, **_kwargs: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(prefetch, "copy_traced", broken)
    monkeypatch.setattr(EarlyTree, "make", broken)
    trees: list[EarlyTree] = []

    async def on_tree(tree: EarlyTree) -> None:
        trees.append(tree)

    cache = NodeCache(tmp_path / "cache")
    trio.run(prefetch.prefetch_snapshot, _remote(snap, listing), cache, "s" * 64, on_tree)
    failed = [r.getMessage() for r in caplog.records if r.exc_info]
    assert any(m.startswith("prefetch of ssssssssssss failed") for m in failed), failed
    assert "no early tree for ssssssssssss" in failed
    assert trees == []


def test_with_no_whole_copy_to_come_the_early_tree_gets_the_rest_the_node_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``--fill-rate off`` no whole copy ever replaces the early overlay, so once the
    prefetch is over every other file the node holds (a sibling env's) is linked in too,
    with the directories on the way (the snapshot's modes, never writable) and their
    symlinks; a file the node lacks is not. With whole copies on, the whole copy does it."""
    import logging

    import trio

    from envfs.fs import prefetch

    def entry(data: bytes) -> ListingEntry:
        return ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)

    snap = tmp_path / "snap"
    (snap / ".envfs").mkdir(parents=True)
    (snap / ".envfs/trace.json").write_text(json.dumps({"files": ["lib/t.py"]}))
    datas = {b"lib/t.py": b"traced\n", b"other/u.py": b"held\n", b"other/v.py": b"lacked\n"}
    for rel, data in datas.items():
        (snap / os.fsdecode(rel)).parent.mkdir(exist_ok=True)
        (snap / os.fsdecode(rel)).write_bytes(data)
    listing = {
        b"": {
            b"lib": ListingEntry("dir", 0o40755, 0, None, None),
            b"other": ListingEntry("dir", 0o40750, 0, None, None),
        },
        b"lib": {b"t.py": entry(datas[b"lib/t.py"])},
        b"other": {
            b"u.py": entry(datas[b"other/u.py"]),
            b"v.py": entry(datas[b"other/v.py"]),
            b"s": ListingEntry("symlink", 0o120777, 4, None, "u.py"),
        },
    }

    for fill_rate, rest in ((0, True), (None, False)):
        cache = NodeCache(tmp_path / f"cache-{fill_rate}", fill_rate=fill_rate)
        for rel in (b"lib/t.py", b"other/u.py"):
            cache.fetch(entry(datas[rel]), os.fsencode(snap) + b"/" + rel)
        trees: list[EarlyTree] = []

        async def on_tree(tree: EarlyTree, trees: list[EarlyTree] = trees) -> None:
            trees.append(tree)

        with caplog.at_level(logging.INFO, logger="envfs.fs.prefetch"):
            trio.run(prefetch.prefetch_snapshot, _remote(snap, listing), cache, "s" * 64, on_tree)
        (tree,) = trees
        assert (tree.path / "lib/t.py").read_bytes() == datas[b"lib/t.py"]  # the prefetch's
        assert (tree.path / "other/u.py").exists() == rest
        assert not (tree.path / "other/v.py").exists()
        if rest:
            assert (tree.path / "other/u.py").read_bytes() == datas[b"other/u.py"]
            assert os.stat(tree.path / "other").st_mode & 0o7777 == 0o550
            assert os.readlink(tree.path / "other/s") == "u.py"
            assert "linked 1 more file(s)" in caplog.text
            assert tree.link_held(listing) == 0  # once
        tree.remove()


def test_files_landing_before_the_early_tree_is_made_are_linked_once_it_is(
    tmp_path: Path,
) -> None:
    """The prefetch copies while the tree is made: what lands first is linked when the
    tree comes; with no tree to come, nothing is kept waiting."""
    from envfs.fs.prefetch import Links

    data = b"early\n"
    entry = ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)
    listing = {b"": {b"lib": ListingEntry("dir", 0o40755, 0, None, None)}, b"lib": {b"a.py": entry}}
    cache = NodeCache(tmp_path / "cache")
    tree = EarlyTree.make(cache, "s" * 64, listing, [b"lib/a.py"])  # before it landed
    (tmp_path / "a.py").write_bytes(data)
    links = Links()
    cache.fetch(entry, os.fsencode(tmp_path / "a.py"))
    links.link(b"lib/a.py", entry)
    assert not (tree.path / "lib/a.py").exists()  # no tree yet for the prefetch
    links.attach(tree)
    assert (tree.path / "lib/a.py").read_bytes() == data and tree.linked == 1
    none = Links()
    none.attach(None)
    none.link(b"lib/a.py", entry)  # nowhere, and nothing kept
    assert none._waiting is None
    tree.remove()


def test_the_prefetch_copies_in_the_order_the_job_needs() -> None:
    """Traced files in trace order, each pack where its first member comes (not every pack
    first: a library the job needs early waited behind packs it needs late)."""
    from envfs.fs import prefetch

    def entry(size: int) -> ListingEntry:
        return ListingEntry("file", 0o100644, size, "0" * 64, None)

    listing = {b"": {n: entry(10) for n in (b"a.so", b"b.so", b"p.py", b"q.py", b"r.py")}}
    packs = [
        (b"late.pack", [(b"r.py", entry(10))]),
        (b"early.pack", [(b"p.py", entry(10)), (b"q.py", entry(10))]),
        (b"untraced.pack", [(b"z.py", entry(10))]),
    ]
    order = prefetch._in_order(["a.so", "p.py", "b.so", "q.py", "r.py"], packs, listing)
    assert order == [(b"a.so", entry(10)), 1, (b"b.so", entry(10)), 0, 2]


def test_a_packs_members_are_held_one_by_one_as_the_pack_is_read(tmp_path: Path) -> None:
    """Each member is an object (and said to have landed) as soon as its bytes are read, in
    pack order, not once the whole pack is: a job waits for the member it needs only. A
    member that does not match its sha256 is skipped, the others still land."""

    def entry(data: bytes) -> ListingEntry:
        return ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)

    datas = [os.urandom(300_000), b"tiny\n", os.urandom(2_000_000), b"last\n"]
    members = [entry(d) for d in datas]
    pack = tmp_path / "x.pack"
    datas[1] = b"TINY\n"  # damaged in the pack
    pack.write_bytes(b"".join(datas))
    cache = NodeCache(tmp_path / "cache")
    landed: list[tuple[int, bool]] = []

    def note(i: int) -> None:
        later_held = [cache.object_path(m) is not None for m in members[i + 1 :]]
        landed.append((i, cache.object_path(members[i]) is not None and not any(later_held)))

    assert cache.unpack(os.fsencode(pack), members, note) == 3
    assert landed == [(0, True), (2, True), (3, True)]
    assert cache.object_path(members[1]) is None


def test_the_node_reads_a_nas_file_in_long_requests(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """A copy tells the NAS client it reads the file straight through (fadvise SEQUENTIAL:
    its read-ahead doubles), so the same bytes cost half the read requests; and reads it
    in long calls: a client that caches no attributes (nas-sim, like NFS with ``noac``)
    asks for them at each call."""
    _env, nas, _mounts = nas_node
    data = os.urandom(PARTIAL_MIN - 4096)  # copied whole (under PARTIAL_MIN), as packs are
    (tmp_path / "backing/blob").write_bytes(data)
    entry = ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)
    cache = NodeCache(tmp_path / "node-cache")
    before = nas.counts()
    held = cache.fetch(entry, os.fsencode(tmp_path / "nas/blob"))
    after = nas.counts()
    reads, looks = (after.get(op, 0) - before.get(op, 0) for op in ("read", "getattr"))
    assert held.read_bytes() == data
    assert reads <= len(data) // (256 << 10) + 4, reads  # 128 KB requests: 32
    assert looks <= 2, looks  # 1 MB at a time: 4


def test_a_killed_daemons_early_overlay_and_tree_are_cleaned_by_the_next_one(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """SIGKILL leaves the early overlay on the dead mount and its tree in the node cache:
    the next daemon on that mountpoint and cache removes both and serves the env again."""
    env, _nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    mnt = tmp_path / "envs"
    mounts.append(Mount(env, mnt, "--fill-rate", "off"))
    view = mnt / "wf/n@1"
    assert py(mnt, "wf/n", "import extra_a").returncode == 0
    wait_for(lambda: _fstype(view) == "overlay", 15, "an overlay on the view")
    early = env.index / "cache/early"
    left = set(os.listdir(early))
    assert len(left) == 2 and any(name.endswith(".erofs") for name in left)  # tree, image
    mounts[0].proc.send_signal(signal.SIGKILL)
    mounts[0].proc.wait(timeout=10)
    mounts[0].killed = True
    assert view in mounts_under(mnt)  # left behind, on a dead FUSE mount
    (env.index / "served.json").unlink(missing_ok=True)  # no preload: the old mounts only
    mounts.append(Mount(env, mnt, "--fill-rate", "off"))
    assert mounts_under(mnt) == []
    assert not left & set(os.listdir(early))
    assert py(mnt, "wf/n", "import extra_a").returncode == 0
    wait_for(lambda: _fstype(view) == "overlay", 15, "a new early overlay")


def test_a_view_no_overlay_can_be_mounted_on_is_served_by_fuse_and_its_tree_still_goes(
    nas_node: tuple[Env, NasSim, list[Mount]], tmp_path: Path
) -> None:
    """overlayfs cannot be given a layer path with ':' in it: the view is served by FUSE
    until the whole copy is in, as before early overlays, and the tree made for it is
    removed with the rest when the daemon stops."""
    env, _nas, mounts = nas_node
    env.run("build", "wf/n", "extra-a==1.0", "--python", PY)
    mnt = tmp_path / "en:vs"
    mounts.append(Mount(env, mnt, "--fill-rate", "off"))
    assert py(mnt, "wf/n", "import extra_a").returncode == 0
    wait_for(lambda: "no early overlay for wf/n@1" in mounts[0].log(), 15, "the refusal")
    assert _fstype(mnt / "wf/n@1") is None
    assert py(mnt, "wf/n", "import extra_a").returncode == 0
    assert os.listdir(env.index / "cache/early")
    mounts[0].stop()
    assert not os.listdir(env.index / "cache/early")


def test_a_packs_members_and_their_links_cost_no_stat_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh node's prefetch unpacks hundreds of small files while the job waits for
    them: whether the node holds each comes from `holds` (memory), and linking one into
    the early tree is the link alone, no stat before either. A member held already is not
    written again; one gone behind the cache's back is not linked (FUSE serves it)."""

    def entry(data: bytes) -> ListingEntry:
        return ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)

    datas = [b"one\n", b"two\n", b"three\n"]
    members = [entry(d) for d in datas]
    pack = tmp_path / "x.pack"
    pack.write_bytes(b"".join(datas))
    (tmp_path / "src").write_bytes(datas[1])
    cache = NodeCache(tmp_path / "cache")
    held = cache.fetch(members[1], os.fsencode(tmp_path / "src"))
    inode = held.stat().st_ino
    listing: Listing = {b"": {b"lib": ListingEntry("dir", 0o40755, 0, None, None)}, b"lib": {}}
    for i, member in enumerate(members):
        listing[b"lib"][f"{i}.py".encode()] = member
    tree = EarlyTree.make(cache, "p" * 64, listing, coming=[b"lib/0.py"])
    with monkeypatch.context() as m:
        m.setattr(os, "stat", lambda *_a, **_k: pytest.fail("a stat per member"))
        assert cache.unpack(os.fsencode(pack), members, lambda _i: None) == 2
        assert all(tree.link(f"lib/{i}.py".encode(), e) for i, e in enumerate(members))
    assert held.stat().st_ino == inode  # the held one was not written again
    assert [(tree.path / f"lib/{i}.py").read_bytes() for i in range(3)] == datas
    gone = entry(b"gone\n")
    listing[b"lib"][b"gone.py"] = gone
    (tmp_path / "src").write_bytes(b"gone\n")
    cache.fetch(gone, os.fsencode(tmp_path / "src")).unlink()  # behind the cache's back
    assert cache.holds(gone) and not tree.link(b"lib/gone.py", gone)
    assert cache.object_path(gone) is None  # its first read copies it again (`fetch`)


def test_the_node_cache_knows_what_it_holds_without_listing_its_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`held` answers from memory (a fresh node's early tree is made with it while the
    first job runs, the page cache cold): what was there when the cache was opened, what
    this process put in since, and after a prune what is left."""
    data = b"held\n"
    entry = ListingEntry("file", 0o100644, len(data), hashlib.sha256(data).hexdigest(), None)
    (tmp_path / "src").write_bytes(data)
    cache = NodeCache(tmp_path / "cache")
    assert cache.held() == set()
    path = cache.fetch(entry, os.fsencode(tmp_path / "src"))
    assert NodeCache(tmp_path / "cache").held() == {path.name}  # found when opened
    with monkeypatch.context() as m:
        m.setattr(os, "listdir", lambda *_a: pytest.fail("listed objects/"))
        assert cache.held() == {path.name}  # put in by this process
    assert cache.prune() == 1  # no copy links it
    assert cache.held() == set() and not path.exists()


def test_a_whole_copy_gives_way_while_the_nas_answers_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small files taking 3x as long as usual (the NAS busy with other nodes' first runs, or
    this node's CPU taken) pause the background copy; at the usual pace it never pauses,
    and a file the NAS client had cached (fast) does not make the usual pace look slow."""
    from envfs.node import copying

    slept: list[float] = []
    monkeypatch.setattr("envfs.node.copying.time.sleep", slept.append)
    way = copying.GiveWay()
    calm = [0.003, 0.0035, 0.004, 0.0032] * 5 + [0.0001]  # one cached file among them
    assert [way.took(t) for t in calm] == [0.0] * len(calm) and not slept
    busy = [way.took(0.02) for _ in range(5)]
    assert busy[:2] == [0.0, 0.0]  # one slow file is not a busy NAS: the median of 5 is
    pause = copying.PAUSE_FACTOR * 0.02
    assert busy[2:] == [pause] * 3 and slept == [pause] * 3 and way.pauses == 3
    assert [way.took(5.0) for _ in range(3)][-1] == copying.PAUSE_MAX  # never long
    assert [way.took(0.003) for _ in range(5)][-1] == 0.0  # calm again: goes on
