"""The foundation through the real CLI: real uv builds, real LMDB, real processes."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from envfs.store.files import remove_tree
from tests.conftest import PY, Env, make_env, reachable_by_all, served_index
from tests.wheels import make_wheel


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def test_two_envs_share_a_package_as_one_inode(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/b", "extra-b==2.0", "--python", PY)
    a, b = local.show("wf/a"), local.show("wf/b")
    assert a["snapshot_id"] != b["snapshot_id"]
    assert a["state"] == b["state"] == "ready"
    rel = "lib/python3.12/site-packages/base_lib/data.py"
    sa, sb = os.stat(Path(a["snapshot_path"]) / rel), os.stat(Path(b["snapshot_path"]) / rel)
    assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    # generated files (bytecode) are shared too, through the object pool
    pyc = next(
        Path(a["snapshot_path"], "lib/python3.12/site-packages/base_lib").glob(
            "__pycache__/data.*.pyc"
        )
    )
    other = Path(b["snapshot_path"]) / pyc.relative_to(a["snapshot_path"])
    assert os.stat(pyc).st_ino == os.stat(other).st_ino


def test_a_build_records_the_files_a_first_import_reads_in_order(local: Env) -> None:
    """The access trace a fresh node prefetches by: the interpreter first, then what
    importing the direct requirements read (sources and bytecode); not what it did not."""
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/t")["snapshot_id"]
    snap = local.store / "snapshots" / sid
    trace = json.loads((snap / ".envfs/trace.json").read_text())["files"]
    site = "lib/python3.12/site-packages"
    assert trace[0].startswith("bin/python3")
    init = f"{site}/extra_a/__pycache__/__init__.cpython-312.pyc"
    assert init in trace and trace.index(init) > 0, trace
    assert all((snap / rel).is_file() for rel in trace)  # what exists, once each
    assert len(set(trace)) == len(trace)
    assert not any(".dist-info/" in rel for rel in trace)  # not read by the import
    assert "access trace:" in (snap / ".envfs/build.log").read_text()
    proc = subprocess.run(
        [str(snap / "bin/python"), "-c", "import extra_a"], capture_output=True, timeout=60
    )
    assert proc.returncode == 0  # the traced import left the env as it was
    assert local.run("verify", sid).returncode == 0


# What a job's plain first import read: the bytecode of every module it loaded from a file
# (its interpreter's start-up modules too) and the .pth files its start read.
_READ_BY_IMPORT = r"""
import json, os, site, sys
import extra_a
read = set()
for module in list(sys.modules.values()):
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.has_location and spec.cached and os.path.isfile(spec.cached):
        read.add(spec.cached)
for folder in site.getsitepackages():
    if os.path.isdir(folder):
        read.update(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pth"))
print(json.dumps(sorted(read)))
"""


def test_the_access_trace_names_the_bytecode_a_jobs_start_reads(local: Env) -> None:
    """The modules the interpreter has imported before the trace's hook (its start, and
    the tracer's own imports: re, enum, functools...) are read by a job as bytecode: the
    trace names that bytecode (a fresh node fetched each of those files on demand, one
    NAS round trip after another, while the trace named their unread sources)."""
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    snap = local.store / "snapshots" / local.show("wf/t")["snapshot_id"]
    trace = set(json.loads((snap / ".envfs/trace.json").read_text())["files"])
    proc = subprocess.run(
        [str(snap / "bin/python"), "-I", "-c", _READ_BY_IMPORT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    root = os.path.realpath(snap)
    read = {
        os.path.relpath(os.path.realpath(p), root)
        for p in json.loads(proc.stdout)
        if os.path.realpath(p).startswith(root + "/")
    }
    stdlib = [rel for rel in read if "site-packages" not in rel]
    assert len(stdlib) > 10, read  # the interpreter's start-up modules are among them
    assert any(rel.endswith(".pth") for rel in read), read
    assert not read - trace, sorted(read - trace)


def test_the_access_trace_begins_with_what_the_interpreters_start_reads(local: Env) -> None:
    """A job first needs its executable, libpython and its start's bytecode (encodings):
    the trace names them first, before the modules the tracer imported for itself (json)
    and their extension modules; and no frozen module's source, which nothing reads."""
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    snap = local.store / "snapshots" / local.show("wf/t")["snapshot_id"]
    trace = json.loads((snap / ".envfs/trace.json").read_text())["files"]
    where = {rel: i for i, rel in enumerate(trace)}

    def first(pattern: str) -> int:
        return min(i for rel, i in where.items() if fnmatch.fnmatch(rel, pattern))

    assert fnmatch.fnmatch(trace[0], "bin/python3*"), trace[:3]
    libpython = first("lib/libpython3*")
    assert libpython < first("lib/python3.12/lib-dynload/*"), trace[:20]
    encodings = first("lib/python3.12/encodings/__pycache__/__init__.*.pyc")
    assert libpython < encodings < first("lib/python3.12/json/*"), trace[:40]
    frozen = subprocess.run(
        [str(snap / "bin/python"), "-c", "import _imp, sys; print(_imp.is_frozen('os'))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert frozen.stdout.strip() == "True"
    assert "lib/python3.12/os.py" not in where and "lib/python3.12/site.py" not in where


def test_the_access_trace_notes_the_parts_of_big_libraries_the_import_touched(
    local: Env,
) -> None:
    """Of a big traced library the import mapped, the trace notes the byte ranges it
    touched: its first page, and parts of its loaded segments (as pyelftools reads them),
    nothing of the debug sections after them (libpython: ~6 of 30 MB)."""
    from elftools.elf.elffile import ELFFile

    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    snap = local.store / "snapshots" / local.show("wf/t")["snapshot_id"]
    trace = json.loads((snap / ".envfs/trace.json").read_text())
    (lib,) = [rel for rel in trace["files"] if os.path.basename(rel).startswith("libpython")]
    ranges = trace["ranges"][lib]
    with open(snap / lib, "rb") as f:
        loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        loaded = max(s["p_offset"] + s["p_filesz"] for s in loads)
    size = (snap / lib).stat().st_size
    assert ranges[0][0] == 0 and all(a < b <= c for (a, b), (c, _) in itertools.pairwise(ranges))
    assert ranges[-1][1] <= -(-loaded // 4096) * 4096 < size  # none of the debug sections
    assert 1 << 20 < sum(b - a for a, b in ranges) < loaded  # some, not all, of the rest
    assert set(trace["ranges"]) <= set(trace["files"])


def test_the_access_trace_names_an_extension_module_where_the_import_loads_it(
    local: Env, wheelhouse: Path
) -> None:
    """A library an import loads comes in the trace where it was needed, before the modules
    imported after it (not after the whole package: a fresh node fetched it last)."""
    make_wheel(
        wheelhouse,
        "ext-order",
        "1.0",
        modules={
            "ext_order/__init__.py": "import cmath\nfrom . import after\n",
            "ext_order/after.py": "X = 1\n",
        },
    )
    local.run("build", "wf/x", "ext-order==1.0", "--python", PY)
    snap = local.store / "snapshots" / local.show("wf/x")["snapshot_id"]
    trace = json.loads((snap / ".envfs/trace.json").read_text())["files"]
    (cmath,) = [rel for rel in trace if os.path.basename(rel).startswith("cmath.")]
    after = "lib/python3.12/site-packages/ext_order/__pycache__/after.cpython-312.pyc"
    assert cmath.endswith(".so") and trace.index(cmath) < trace.index(after), trace


def test_snapshot_runs_is_read_only_and_names_no_builder_path(local: Env) -> None:
    local.run("build", "wf/tool", "tool-pkg==0.1", "--python", PY)
    info = local.show("wf/tool")
    root = Path(info["snapshot_path"])
    out = subprocess.run(
        [root / "bin/python", "-c", "import tool_pkg, sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(root)
    script = subprocess.run([root / "bin/envfs-demo-tool"], capture_output=True, text=True)
    assert script.returncode == 0 and script.stdout.startswith("tool ")
    staging = str(local.store / "staging").encode()
    for path in _files(root):
        st = os.lstat(path)
        if path.is_symlink():
            continue
        assert not st.st_mode & 0o222, f"{path} is writable"
        assert staging not in path.read_bytes(), f"{path} names the staging dir"
    assert not os.stat(root).st_mode & 0o222
    manifest = json.loads((root / ".envfs/manifest.json").read_text())
    assert manifest["tree_digest"] and manifest["file_count"] > 10
    assert "<store>" in (root / ".envfs/build.log").read_text()


def test_second_binding_of_a_spec_reuses_the_snapshot(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/c", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/a")["snapshot_id"]
    assert local.show("wf/c")["snapshot_id"] == sid
    assert local.built_events(sid) == 1
    events = [e["event"] for e in local.audit()]
    assert events.count("bound") == 2 and events.count("build_started") == 1
    for e in local.audit():
        assert {"event", "snapshot_id", "host", "time"} <= e.keys()


def test_bind_alone_does_not_build(local: Env) -> None:
    local.run("bind", "wf/lazy", "extra-b==2.0", "--python", PY)
    info = local.show("wf/lazy")
    assert info["state"] == "bound"
    assert not Path(info["snapshot_path"]).exists()
    assert local.built_events(info["snapshot_id"]) == 0


def test_concurrent_builds_of_one_new_spec_build_once(local: Env) -> None:
    procs = [local.popen("build", f"wf/n{i}", "slow-pkg==1.0", "--python", PY) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    sid = local.show("wf/n0")["snapshot_id"]
    assert {local.show(f"wf/n{i}")["snapshot_id"] for i in range(3)} == {sid}
    assert local.built_events(sid) == 1


def _wait_for_child(pid: int, needle: str, deadline: float) -> bool:
    """True once a process in ``pid``'s session runs a command line containing ``needle``."""
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                sid = os.getsid(int(entry))
            except (OSError, ProcessLookupError):
                continue
            if sid == pid and needle.encode() in cmdline:
                return True
        time.sleep(0.01)
    return False


def test_sigkill_during_uv_sync_leaves_no_snapshot_and_next_build_succeeds(local: Env) -> None:
    proc = local.popen("build", "wf/k", "slow-pkg==1.0", "--python", PY, start_new_session=True)
    try:
        assert _wait_for_child(proc.pid, "uv sync", time.monotonic() + 120), "uv sync never ran"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert local.listing("snapshots") == set()
    assert local.listing("bindings") == set()
    local.run("build", "wf/k", "slow-pkg==1.0", "--python", PY, timeout=300)
    info = local.show("wf/k")
    assert info["state"] == "ready"
    assert local.built_events(info["snapshot_id"]) == 1
    assert not any(n.startswith(info["snapshot_id"]) for n in local.listing("staging"))


def test_same_lock_in_two_stores_gives_the_same_tree_digest(
    tmp_path: Path, wheelhouse: Path
) -> None:
    one, two = make_env(tmp_path / "one", wheelhouse), make_env(tmp_path / "deeper/two", wheelhouse)
    one.run("build", "wf/a", "extra-a==1.0", "tool-pkg==0.1", "--python", PY)
    sid = one.show("wf/a")["snapshot_id"]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        (project / name).write_bytes((one.store / "specs" / sid / name).read_bytes())
    two.run("build", "wf/b", "--project", str(project), "--python", PY)
    assert two.show("wf/b")["snapshot_id"] == sid

    def digest(env: Env) -> str:
        m = env.store / "snapshots" / sid / ".envfs/manifest.json"
        return str(json.loads(m.read_text())["tree_digest"])

    assert digest(one) == digest(two)


def test_rollback_appends_a_revision(local: Env) -> None:
    local.run("build", "wf/r", "extra-a==1.0", "--python", PY)
    first = local.show("wf/r")["snapshot_id"]
    local.run("build", "wf/r", "extra-b==2.0", "--python", PY)
    assert local.show("wf/r")["revision"] == 2
    local.run("rollback", "wf/r")
    info = local.show("wf/r")
    assert (info["revision"], info["snapshot_id"]) == (3, first)
    history = json.loads(local.run("history", "wf/r", "--json").stdout)
    assert [h["revision"] for h in history] == [1, 2, 3]
    assert history[2]["action"] == "rollback" and history[2]["rollback_to"] == 1
    local.run("rollback", "wf/r", "--to", "2")
    assert local.show("wf/r")["revision"] == 4
    assert local.show("wf/r@1")["snapshot_id"] == first
    bad = local.run("rollback", "wf/r", "--to", "99", check=False)
    assert bad.returncode == 4 and "no revision 99" in bad.stderr
    assert "rolled_back" in [e["event"] for e in local.audit()]


def test_missing_or_corrupt_index_is_rebuilt_with_identical_answers(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    local.run("bind", "wf/b", "extra-b==2.0", "--python", PY)
    before = json.loads(local.run("ls", "--json").stdout)
    import shutil

    shutil.rmtree(local.index)
    assert json.loads(local.run("ls", "--json").stdout) == before
    data = local.index / "data.mdb"
    data.write_bytes(b"\xde\xad" * 4096)
    after = local.run("ls", "--json")
    assert json.loads(after.stdout) == before
    assert "rebuilding the index" in after.stderr
    rebuilt = local.run("index", "rebuild")
    assert "2 binding(s)" in rebuilt.stdout


def test_the_index_never_deletes_what_envfs_did_not_make(
    local: Env, tmp_path: Path, wheelhouse: Path
) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mine = tmp_path / "mine"
    (mine / "project").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    (mine / "project" / "a.txt").write_text("keep")
    other = make_env(tmp_path / "other", wheelhouse)
    for env, args in ((local, ["ls"]), (other, ["bind", "x/y", "extra-b==2.0", "--python", PY])):
        out = env.run("--index", str(mine), *args, check=False)
        assert out.returncode == 3, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert "did not make" in line, line
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "notes.txt", "project", "project/a.txt"
    ]  # fmt: skip
    # an index of one store, opened for another, is rebuilt in place: its own files only
    index = tmp_path / "index"
    local.run("--index", str(index), "ls")
    assert sorted(p.name for p in index.iterdir()) == ["data.mdb", "envfs-index", "lock.mdb"]
    other.run("--index", str(index), "bind", "x/y", "extra-b==2.0", "--python", PY)
    listed = json.loads(other.run("--index", str(index), "ls", "--json").stdout)
    assert [(b["workflow"], b["node"]) for b in listed] == [("x", "y")]
    # an index made before the marker existed (LMDB files only) is still taken as ours
    (index / "envfs-index").unlink()
    assert other.run("--index", str(index), "ls").returncode == 0
    assert (index / "envfs-index").exists()


def test_du_counts_hardlinked_files_once(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/b", "extra-b==2.0", "--python", PY)
    du = json.loads(local.run("du", "--json").stdout)
    assert du["snapshots"] == 2
    assert 0 < du["real_bytes"] < du["apparent_bytes"]


def test_verify_detects_a_damaged_snapshot(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    assert local.run("verify").returncode == 0
    victim = Path(local.show("wf/a")["snapshot_path"]) / "lib/python3.12/site-packages/extra_a"
    os.chmod(victim, 0o755)
    (victim / "evil.py").write_text("x = 1\n")
    bad = local.run("verify", "wf/a", check=False)
    assert bad.returncode == 5 and "unexpected" in bad.stdout


def test_verify_reports_a_snapshot_whose_spec_is_gone(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/a")["snapshot_id"]
    spec = local.store / "specs" / sid / "spec.json"
    os.chmod(spec.parent, 0o755)
    spec.unlink()
    bad = local.run("verify", check=False)
    assert bad.returncode == 5 and f"specs/{sid}/spec.json: missing" in bad.stdout, bad.stdout
    assert local.run("verify", sid[:12], check=False).returncode == 5


def test_the_index_is_its_owners_only(local: Env) -> None:
    local.index.mkdir(mode=0o755)  # as an older envfs, or a careless operator, left it
    os.chmod(local.index, 0o755)
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    assert local.index.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["../x", "extra-a==1.0"], 3, "dot"),
        (["a/b/c", "extra-a==1.0"], 3, "WORKFLOW/NODE"),
        (["", "extra-a==1.0"], 3, "WORKFLOW/NODE"),
        ([".hidden/x", "extra-a==1.0"], 3, "dot"),
        (["wf/" + "n" * 300, "extra-a==1.0"], 3, "limit"),
        (["wf/x", "envfs-no-such-package-zzz==1.0"], 3, "envfs-no-such-package-zzz"),
        (["wf/x", "extra-a==1.0", "--python", "3.99"], 6, "not installed"),
        (["wf/x", "--project", "/nonexistent-dir"], 3, "pyproject.toml"),
        (["wf/x"], 3, "no packages"),
        (["wf/x", "extra-a @ file:///tmp/extra-a"], 3, "--allow-local"),
        (["wf/x", "extra-a@./src"], 3, "local path"),
        (["wf/x\n", "extra-a==1.0"], 3, "characters"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    local: Env, args: list[str], code: int, words: str
) -> None:
    local.run("build", "wf/ok", "extra-a==1.0", "--python", PY)
    snapshots, bindings = local.listing("snapshots"), local.listing("bindings")
    if "--python" not in args:
        args += ["--python", PY]
    proc = local.run("build", *args, check=False)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("envfs: error:"), proc.stderr
    assert words in lines[0]
    assert "Traceback" not in proc.stderr
    assert local.listing("snapshots") == snapshots
    assert local.listing("bindings") == bindings


def test_project_without_lock_is_refused(local: Env, tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj/pyproject.toml").write_text("[project]\nname='p'\nversion='0'\n")
    proc = local.run("build", "wf/p", "--project", str(tmp_path / "proj"), check=False)
    assert proc.returncode == 3 and "uv lock" in proc.stderr


def test_cache_on_another_filesystem_is_an_error(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)  # creates the store
    cache = local.store / "uv-cache"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(cache)], check=True)
    try:
        proc = local.run("build", "wf/b", "extra-b==2.0", "--python", PY, check=False)
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=True)
    assert proc.returncode == 8 and "hardlinks are impossible" in proc.stderr
    assert local.show("wf/a")["state"] == "ready"
    assert not (local.store / "bindings/wf/b").exists()


@pytest.mark.network
def test_real_pypi_packages_build_and_share_inodes(pypi: Env) -> None:
    pypi.run("build", "net/a", "six==1.16.0", "attrs==24.2.0", "--python", PY)
    pypi.run("build", "net/b", "six==1.16.0", "idna==3.10", "--python", PY)
    a, b = pypi.show("net/a"), pypi.show("net/b")
    six_a = os.stat(Path(a["snapshot_path"]) / "lib/python3.12/site-packages/six.py")
    six_b = os.stat(Path(b["snapshot_path"]) / "lib/python3.12/site-packages/six.py")
    assert six_a.st_ino == six_b.st_ino
    out = subprocess.run(
        [Path(a["snapshot_path"]) / "bin/python", "-c", "import attrs, six"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def _bytecode_stats(env: Env, target: str) -> tuple[int, int, int]:
    """(modules, reused, compiled) from the build log of ``target``'s snapshot."""
    log = (Path(env.show(target)["snapshot_path"]) / ".envfs/build.log").read_text()
    match = re.search(r"bytecode: (\d+) modules, (\d+) reused, (\d+) compiled", log)
    assert match is not None, log
    return int(match[1]), int(match[2]), int(match[3])


def _manifest(env: Env, target: str) -> dict[str, Any]:
    path = Path(env.show(target)["snapshot_path"]) / ".envfs/manifest.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_reused_bytecode_build_is_byte_identical_to_a_fresh_one(
    tmp_path: Path, wheelhouse: Path
) -> None:
    one = make_env(tmp_path / "one", wheelhouse)
    one.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    one.run("build", "wf/b", "extra-a==1.0", "tool-pkg==0.1", "--python", PY)
    modules, reused, compiled = _bytecode_stats(one, "wf/b")
    assert reused > 0 and compiled > 0 and reused + compiled == modules  # base_lib from wf/a
    sid = one.show("wf/b")["snapshot_id"]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        (project / name).write_bytes((one.store / "specs" / sid / name).read_bytes())
    fresh = make_env(tmp_path / "fresh", wheelhouse)
    fresh.run("build", "wf/b", "--project", str(project), "--python", PY)
    assert fresh.show("wf/b")["snapshot_id"] == sid
    assert _bytecode_stats(fresh, "wf/b") == (modules, 0, modules)
    a, b = _manifest(one, "wf/b"), _manifest(fresh, "wf/b")
    assert a["files"] == b["files"] and a["tree_digest"] == b["tree_digest"]
    assert any(f["path"].endswith(".pyc") for f in a["files"])


def test_damaged_bytecode_in_the_pool_is_detected_not_served(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    rel = "lib/python3.12/site-packages/base_lib/__pycache__/__init__.cpython-312.pyc"
    (entry,) = [f for f in _manifest(local, "wf/a")["files"] if f["path"] == rel]
    good = entry["sha256"]
    obj = local.store / "objects" / good[:2] / f"{good}.444"
    assert os.stat(obj).st_ino == os.stat(Path(local.show("wf/a")["snapshot_path"]) / rel).st_ino
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the code object
    obj.write_bytes(bytes(data))
    os.chmod(obj, 0o444)

    local.run("build", "wf/b", "extra-a==1.0", "tool-pkg==0.1", "--python", PY)
    served = Path(local.show("wf/b")["snapshot_path"]) / rel
    assert hashlib.sha256(served.read_bytes()).hexdigest() == good
    assert _bytecode_stats(local, "wf/b")[1] > 0  # other modules still came from the pool
    log = (Path(local.show("wf/b")["snapshot_path"]) / ".envfs/build.log").read_text()
    assert "damaged bytecode in the pool" in log
    assert any(n.startswith(f"damaged-{good}") for n in local.listing("trash"))
    assert local.run("verify", "wf/b").returncode == 0
    assert local.run("verify", "wf/a", check=False).returncode == 5  # the old one is damaged


def test_wheel_files_are_hashed_once_per_node(local: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file shared with uv's cache is hashed by the first build that links it; later
    builds take its digest from the node's index (same inode, size and mtime)."""
    from envfs.core.config import Settings
    from envfs.node.index import Index
    from envfs.service.envs import Inputs, Service

    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    rel = "lib/python3.12/site-packages/base_lib-1.0.dist-info/METADATA"
    path = Path(local.show("wf/a")["snapshot_path"]) / rel
    st = os.stat(path)
    assert st.st_nlink > 1  # linked from uv's cache
    hits: list[int] = []
    real = Index.cached_digest

    def counting(self: Index, st: os.stat_result) -> str | None:
        digest = real(self, st)
        if digest is not None:
            hits.append(st.st_ino)
        return digest

    monkeypatch.setattr(Index, "cached_digest", counting)
    for key, value in local.vars.items():
        if key.startswith("UV_"):
            monkeypatch.setenv(key, value)  # the in-process build uses the local wheels
    svc = Service(Settings.resolve(local.store, local.index))
    resolved = svc.resolve(Inputs(packages=("extra-a==1.0", "tool-pkg==0.1"), python=PY))
    svc.ensure_built(resolved.snapshot_id)
    assert st.st_ino in hits  # METADATA's digest came from the index
    assert svc.index.cached_digest(st) == hashlib.sha256(path.read_bytes()).hexdigest()
    svc.bind("wf", "b", resolved.snapshot_id)
    assert local.run("verify", "wf/b").returncode == 0


def test_verify_all_goes_on_past_damage_and_names_every_kind(local: Env) -> None:
    for name, spec in (("a", "extra-a==1.0"), ("b", "tool-pkg==0.1"), ("gone", "extra-b==2.0")):
        local.run("build", f"wf/{name}", spec, "--python", PY)
    a, b, gone = (local.show(f"wf/{n}") for n in ("a", "b", "gone"))
    assert local.run("verify", "--all").returncode == 0

    manifest = Path(a["snapshot_path"]) / ".envfs/manifest.json"
    os.chmod(manifest.parent, 0o755)
    os.chmod(manifest, 0o644)
    manifest.write_text("{ not json")  # one unreadable manifest must not stop the others
    root = Path(b["snapshot_path"])
    site = root / "lib/python3.12/site-packages"
    os.chmod(site, 0o755)
    os.mkfifo(site / "a-fifo")
    os.chmod(site / "tool_pkg", 0o755)
    (site / "tool_pkg/__init__.py").unlink()
    remove_tree(Path(gone["snapshot_path"]))  # bound, built, and now gone
    cached = next((local.store / "uv-cache/archive-v0").glob("*/base_lib/data.py"))
    os.chmod(cached, 0o644)
    cached.write_text("# tampered\n")  # a uv cache file that no longer matches its RECORD

    out = local.run("verify", "--all", "--json", check=False)
    assert out.returncode == 5
    report = json.loads(out.stdout)
    assert report["damaged"][a["snapshot_id"]][0].startswith("manifest unreadable")
    problems = report["damaged"][b["snapshot_id"]]
    assert "special file (a FIFO): lib/python3.12/site-packages/a-fifo" in problems
    assert "missing: lib/python3.12/site-packages/tool_pkg/__init__.py" in problems
    assert report["gone"] == [f"wf/gone@1: snapshot {gone['snapshot_id'][:12]} is gone"]
    assert any(p.startswith("changed: archive-v0/") and p.endswith("base_lib/data.py")
               for p in report["uv_cache"])  # fmt: skip
    text = local.run("verify", check=False)
    assert text.returncode == 5 and "tool_pkg/__init__.py" in text.stdout
    one = local.run("verify", "wf/b", check=False)
    assert one.returncode == 5 and "gone" not in one.stdout


def test_a_damaged_uv_cache_file_fails_the_build_naming_it(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    cached = next((local.store / "uv-cache/archive-v0").glob("*/base_lib/data.py"))
    os.chmod(cached, 0o644)
    data = bytearray(cached.read_bytes())
    data[0] ^= 0x01  # one flipped bit in a file every later env of base_lib links
    cached.write_bytes(bytes(data))
    before = local.listing("snapshots")
    objects = {p.name for p in (local.store / "objects").glob("*/*")}
    out = local.run("build", "wf/b", "extra-a==1.0", "tool-pkg==0.1", "--python", PY, check=False)
    assert out.returncode == 5
    (line,) = out.stderr.strip().splitlines()
    assert "base_lib/data.py" in line and "RECORD" in line and "uv cache clean base_lib" in line
    assert local.listing("snapshots") == before  # nothing blessed the damage
    assert not [n for n in local.listing("staging") if not n.startswith(".")]
    # what the failed build put in the pool (tool_pkg's bytecode, RECORDs) went with it
    assert {p.name for p in (local.store / "objects").glob("*/*")} == objects


def _both_succeed_with_one_build(
    local: Env, first: subprocess.Popen[str], second: subprocess.Popen[str]
) -> str:
    """Both builds of wf/k (first) and wf/k2 (second), one spec, succeeded cleanly and the
    snapshot was built once; its id."""
    _, err2 = second.communicate(timeout=300)
    _, err1 = first.communicate(timeout=300)
    assert second.returncode == 0, err2
    assert first.returncode == 0, err1
    assert "Traceback" not in err1 + err2
    sid = local.show("wf/k")["snapshot_id"]
    assert local.show("wf/k2")["snapshot_id"] == sid and local.built_events(sid) == 1
    return str(sid)


def test_a_builder_stopped_as_it_took_the_lease_cleans_nothing_of_the_new_holders(
    local: Env,
) -> None:
    """Stopped right after taking the lease (before it cleaned staging), resumed once the
    new holder is building: it must not take the new holder's staging dir for a dead
    build's (the second build failed on a vanished staging dir, under load, in CI)."""
    local.vars["ENVFS_LEASE_STALE"] = "3"
    local.vars["ENVFS_STOP_AT"] = "leased"
    first = local.popen("build", "wf/k", "slow-pkg==1.0", "--python", PY)
    del local.vars["ENVFS_STOP_AT"]
    deadline = time.monotonic() + 60

    def state(pid: int) -> str:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

    while state(first.pid) != "T":  # stopped itself, lease in hand
        assert time.monotonic() < deadline and first.poll() is None, "the first did not stop"
        time.sleep(0.05)
    try:
        time.sleep(3.5)  # past the lease's staleness
        second = local.popen("build", "wf/k2", "slow-pkg==1.0", "--python", PY)
        staging = local.store / "staging"

        def building() -> bool:  # its snapshot's staging dir: <snapshot id>.<host>.<nonce>
            return any(re.fullmatch(r"[0-9a-f]{64}\..+", n) for n in os.listdir(staging))

        while not building():
            assert time.monotonic() < deadline and second.poll() is None, "no new staging dir"
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _both_succeed_with_one_build(local, first, second)


def test_a_builder_resumed_past_its_lease_leaves_the_new_holder_alone(local: Env) -> None:
    """Stopped past the lease's staleness, then resumed: it must not delete the new holder's
    lease or staging dir, nor publish over it; exactly one build, and both commands succeed."""
    local.vars["ENVFS_LEASE_STALE"] = "3"
    first = local.popen("build", "wf/k", "slow-pkg==1.0", "--python", PY, start_new_session=True)
    locks = local.store / "locks"
    deadline = time.monotonic() + 60
    while not list(locks.glob("*.lease")) if locks.exists() else True:
        assert time.monotonic() < deadline and first.poll() is None, "no lease taken"
        time.sleep(0.05)
    (lease,) = locks.glob("*.lease")
    os.killpg(first.pid, signal.SIGSTOP)  # the whole build, uv included, as a frozen node
    try:
        time.sleep(4.5)
        second = local.popen("build", "wf/k2", "slow-pkg==1.0", "--python", PY)
        deadline = time.monotonic() + 60
        while True:  # the second builder breaks the stale lease and takes its own
            try:
                holder = json.loads(lease.read_text())["pid"]
            except (FileNotFoundError, ValueError):
                holder = None
            if holder not in (None, first.pid):
                break
            assert time.monotonic() < deadline and second.poll() is None, "lease not taken over"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    sid = _both_succeed_with_one_build(local, first, second)
    assert local.show("wf/k")["state"] == "ready"
    events = [e["event"] for e in local.audit()]
    assert events.count("lease_broken") == 1 and events.count("lease_lost") == 1
    assert not list(locks.glob(f"{sid}*"))
    assert not [n for n in local.listing("staging") if n.startswith(sid)]
    assert local.run("verify", "wf/k").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_store_is_one_line_and_leaves_nothing_half_written(
    tmp_path: Path, wheelhouse: Path
) -> None:
    env = make_env(tmp_path / "small", wheelhouse, seed=False)
    env.store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "none", str(env.store)], check=True)
    try:
        out = env.run("build", "wf/a", "extra-a==1.0", "--python", PY, check=False)
        assert out.returncode == 8, out.stderr  # the interpreter and the cache do not fit
        (line,) = out.stderr.strip().splitlines()
        assert ("No space left" in line or "full" in line) and "Traceback" not in out.stderr
        assert [p for p in env.listing("interpreters") if p != "by-source"] == []
        assert [n for n in env.listing("staging") if not n.startswith(".")] == []
        subprocess.run(["umount", str(env.store)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "none", str(env.store)],
                       check=True)  # fmt: skip
        env.run("python", "add", PY)
        free = os.statvfs(env.store).f_bavail * os.statvfs(env.store).f_frsize
        with open(env.store / "filler", "wb") as f:  # leave ~64 KiB: the build runs out
            f.truncate(0)
            f.write(b"\0" * max(0, free - 64 * 1024))
        out = env.run("build", "wf/a", "extra-a==1.0", "--python", PY, check=False)
        assert out.returncode == 8, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert env.listing("snapshots") == set()  # no incomplete snapshot
        os.unlink(env.store / "filler")
        env.run("build", "wf/a", "extra-a==1.0", "--python", PY)  # space again: it builds
        assert env.run("verify", "--all").returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(env.store)], check=False)


def test_index_values_that_do_not_decode_rebuild_the_index(local: Env) -> None:
    import lmdb

    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    want = local.show("wf/a")
    env = lmdb.open(str(local.index), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"wf/a", b"\xff not json", db=env.open_db(b"bindings", txn=txn))
    finally:
        env.close()
    out = local.run("ls", "--json")
    assert "Traceback" not in out.stderr and "rebuilding the index" in out.stderr
    assert json.loads(out.stdout)[0]["snapshot_id"] == want["snapshot_id"]
    assert local.show("wf/a") == want


def test_a_project_whose_lock_does_not_match_is_refused(local: Env, tmp_path: Path) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/a")["snapshot_id"]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        (project / name).write_bytes((local.store / "specs" / sid / name).read_bytes())
    local.run("build", "wf/p", "--project", str(project), "--python", PY)  # as locked: fine
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("extra-a==1.0", "extra-b==2.0"))
    before = local.listing("specs")
    out = local.run("build", "wf/q", "--project", str(project), "--python", PY, check=False)
    assert out.returncode == 3, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "does not match its pyproject.toml" in line and "uv lock" in line
    assert local.listing("specs") == before


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]
_HOLD = (
    "import fcntl, time; fcntl.flock({fd}, fcntl.LOCK_EX); print('held', flush=True); "
    "time.sleep(120)"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another user (setpriv)")
def test_a_node_user_cannot_freeze_builds_with_flock(local: Env) -> None:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    with reachable_by_all(local.store):  # by `nobody`, as on a node
        gc = local.store / "locks" / "gc"
        for private in (gc, local.store / "leases"):  # lock and lease files: not for others
            out = subprocess.run(
                [*NOBODY, f"import os; os.listdir({str(private)!r}) if os.path.isdir("
                 f"{str(private)!r}) else open({str(private)!r})"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode != 0 and "PermissionError" in out.stderr, out
        # a holder whose descriptor predates that (a store made by an older envfs) costs a
        # bind a bounded wait and one line naming it, not a hang
        fd = os.open(gc, os.O_RDONLY)
        holder = subprocess.Popen(
            [*NOBODY, _HOLD.format(fd=fd)], pass_fds=(fd,), stdout=subprocess.PIPE, text=True
        )
        os.close(fd)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            local.vars["ENVFS_FENCE_WAIT"] = "2"
            out = local.run("bind", "wf/b", "extra-b==2.0", "--python", PY, check=False)
            assert out.returncode == 7, out.stderr
            (line,) = out.stderr.strip().splitlines()
            assert f"pid {holder.pid}" in line and "user nobody" in line, line
        finally:
            holder.kill()
            holder.wait(timeout=30)
        assert not (local.store / "bindings" / "wf" / "b").exists()
        local.run("bind", "wf/b", "extra-b==2.0", "--python", PY)


def _local_index(root: Path, wheelhouse: Path) -> Path:
    """A PEP 503 tree: ``probe`` only as an sdist whose setup.py would record its uid,
    and the test wheels (``extra-a`` and its dependency) as wheels."""
    import tarfile

    simple = root / "simple"
    src = root / "src" / "probe-1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(
        "import os, pathlib\npathlib.Path('/tmp/envfs-probe-ran').write_text(str(os.getuid()))\n"
        "from setuptools import setup\nsetup(name='probe', version='1.0')\n"
    )
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: probe\nVersion: 1.0\n")
    (simple / "probe").mkdir(parents=True)
    with tarfile.open(simple / "probe" / "probe-1.0.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="probe-1.0")
    (simple / "probe" / "index.html").write_text(
        '<a href="probe-1.0.tar.gz">probe-1.0.tar.gz</a>\n'
    )
    for wheel in wheelhouse.glob("*.whl"):
        name = wheel.name.split("-")[0].replace("_", "-")
        (simple / name).mkdir(exist_ok=True)
        (simple / name / wheel.name).write_bytes(wheel.read_bytes())
        with open(simple / name / "index.html", "a") as f:
            f.write(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    return simple


def test_wheels_only_refuses_a_source_build_in_one_line_and_binds_nothing(
    tmp_path: Path, wheelhouse: Path
) -> None:
    simple = _local_index(tmp_path / "index", wheelhouse)
    with served_index(simple, "probe/") as url:
        env = make_env(tmp_path / "node", None)
        Path("/tmp/envfs-probe-ran").unlink(missing_ok=True)
        try:
            proc = env.run("build", "s/wo", "probe==1.0", "--python", PY, "--index-url", url,
                           "--build-policy", "wheels-only", check=False)  # fmt: skip
            assert proc.returncode == 3, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and "probe" in proc.stderr
            assert "source build" in proc.stderr
            assert not Path("/tmp/envfs-probe-ran").exists()  # its build code never ran
            assert env.run("show", "s/wo", check=False).returncode != 0  # nothing bound
            # wheels pass: the policy refuses source builds, not packages
            env.run("build", "s/ok", "extra-a==1.0", "--python", PY, "--index-url", url,
                    "--build-policy", "wheels-only")  # fmt: skip
            assert env.show("s/ok")["state"] == "ready"
            # the store's default (envfs.toml) applies when no --build-policy is given
            config = env.store / "envfs.toml"
            config.write_text(config.read_text() + 'build_policy = "wheels-only"\n')
            proc = env.run("build", "s/wo", "probe==1.0", "--python", PY, "--index-url", url,
                           check=False)  # fmt: skip
            assert proc.returncode == 3 and "wheels-only" in proc.stderr, proc.stderr
            assert not Path("/tmp/envfs-probe-ran").exists()
        finally:
            Path("/tmp/envfs-probe-ran").unlink(missing_ok=True)


@pytest.mark.network
def test_a_source_build_runs_unprivileged_and_the_package_still_installs(
    pypi: Env, tmp_path: Path
) -> None:
    """An sdist whose setup.py records who ran it and tries to write the store, the uv
    cache and /root and to read a root-only file: it ran as the build user, every attempt
    failed, and the package is in the env (build dependencies came from PyPI)."""

    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    simple = tmp_path / "index" / "simple"
    src = tmp_path / "index" / "src" / "uidprobe-1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(f"""
import os, json, pathlib
r = {{"uid": os.getuid()}}
def tryit(name, fn):
    try:
        fn(); r[name] = "done"
    except Exception as e:
        r[name] = type(e).__name__
tryit("write_store", lambda: pathlib.Path({str(pypi.store)!r}, "pwned").write_text("x"))
tryit("write_cache", lambda: pathlib.Path({str(pypi.store)!r}, "uv-cache", "pwned").write_text("x"))
tryit("write_root", lambda: pathlib.Path("/root/envfs-test-pwned").write_text("x"))
tryit("read_token", lambda: pathlib.Path({str(secret)!r}).read_text())
pathlib.Path("uidprobe_report.py").write_text("REPORT = " + json.dumps(r) + "\\n")
from setuptools import setup
setup(name="uidprobe", version="1.0", py_modules=["uidprobe_report"])
""")
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: uidprobe\nVersion: 1.0\n")
    (simple / "uidprobe").mkdir(parents=True)
    import tarfile

    with tarfile.open(simple / "uidprobe" / "uidprobe-1.0.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="uidprobe-1.0")
    (simple / "uidprobe" / "index.html").write_text(
        '<a href="uidprobe-1.0.tar.gz">uidprobe-1.0.tar.gz</a>\n'
    )
    with served_index(simple, "uidprobe/") as url, contextlib.ExitStack() as cleanup:
        cleanup.callback(Path("/root/envfs-test-pwned").unlink, missing_ok=True)
        pypi.run("build", "s/p", "uidprobe==1.0", "--python", PY, "--extra-index-url", url)
        snap = Path(pypi.show("s/p")["snapshot_path"])
        out = subprocess.run(
            [str(snap / "bin/python"), "-c",
             "import json, uidprobe_report; print(json.dumps(uidprobe_report.REPORT))"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        if os.geteuid() == 0:  # run as root: the build ran as the build user, could do none
            probes = ("write_store", "write_cache", "write_root", "read_token")
            assert report["uid"] != 0, report
            assert {k: report[k] for k in probes} == dict.fromkeys(probes, "PermissionError")
        assert not (pypi.store / "pwned").exists() and not (pypi.store / "uv-cache/pwned").exists()
        assert not Path("/root/envfs-test-pwned").exists()


def test_verify_names_a_damaged_access_trace(local: Env) -> None:
    """A trace is a hint (nodes ignore a bad one), but a damaged one is named."""
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    sid = local.show("wf/t")["snapshot_id"]
    trace = local.store / "snapshots" / sid / ".envfs/trace.json"
    assert local.run("verify", sid).returncode == 0
    good = trace.read_text()
    os.chmod(trace.parent, 0o755)
    os.chmod(trace, 0o644)
    try:
        trace.write_text('{"files": ["lib/../../etc/passwd"]}')
        proc = local.run("verify", sid, check=False)
        assert proc.returncode == 5 and "not a file of the snapshot" in proc.stdout + proc.stderr
        trace.write_text("{ garbage")
        proc = local.run("verify", sid, check=False)
        assert proc.returncode == 5 and "trace.json: unreadable" in proc.stdout + proc.stderr
        lib = next(rel for rel in json.loads(good)["ranges"] if "libpython" in rel)
        size = (trace.parent.parent / lib).stat().st_size
        past = {"files": [lib], "ranges": {lib: [[0, 4096], [size, size + 4096]]}}
        trace.write_text(json.dumps(past))
        proc = local.run("verify", sid, check=False)
        assert proc.returncode == 5 and f"a range of {lib} is not" in proc.stdout + proc.stderr
    finally:
        trace.write_text(good)
