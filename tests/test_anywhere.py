"""Self-contained envs: the interpreter is captured into the store and served with the env,
so an env runs where nothing but the mount exists (no builder Python, no store, any user,
a bare chroot with the mount seen at another path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from envfs.build import interpreters
from envfs.build.relocate import is_elf, patchelf_binary
from envfs.store.formats import Interpreter, SpecInfo
from tests.conftest import PY, Env, make_env, reachable_by_all
from tests.test_e2e import Mount, fs  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unshare, chroot, setpriv)"),
]

#: What every test env must import where only the mount exists.
STDLIB = "ssl, sqlite3, ctypes, lzma, bz2, zlib, readline, uuid, decimal, hashlib, json"
PROBE = f"""
import sys, {STDLIB}
root, pinned = sys.argv[1], sys.argv[1] + "@1"  # started as WF/NODE, runs in WF/NODE@REV
outside = [p for p in sys.path[1:] if p and not p.startswith(pinned + "/")]
assert not outside, f"sys.path outside the env: {{outside}}"
assert sys.prefix == sys.base_prefix == pinned, (sys.prefix, sys.base_prefix)
assert sys.executable.startswith(root + "/"), sys.executable
sqlite3.connect(":memory:").execute("select 1")
ctypes.CDLL(None)
import extra_a, base_lib
print("ok", sys.version_info[:2], base_lib.hello())
"""
#: Libraries a manylinux wheel may assume of a host: all a bare chroot gets.
HOST_LIBS = [
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libutil.so.1",
    "libresolv.so.2",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _pythons_to_hide(env: Env) -> list[str]:
    """The store, the builder's interpreters (pyenv) and every system Python's library."""
    hide = [str(env.store)]
    pyenv = interpreters._pyenv_root()
    if pyenv is not None:
        hide.append(str(pyenv))
    for base in ("/usr/lib", "/usr/local/lib"):
        hide += [str(p) for p in Path(base).glob("python3*") if p.is_dir()]
    return hide


@pytest.fixture
def built(fs: tuple[Env, Path, list[Mount]]) -> Iterator[tuple[Env, Path]]:  # noqa: F811
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "tool-pkg==0.1", "--python", PY)
    mounts.append(Mount(env, mnt))
    with reachable_by_all(mnt):  # by `nobody`
        yield env, mnt


def test_env_runs_as_nobody_with_builder_python_and_store_hidden(
    built: tuple[Env, Path],
) -> None:
    env, mnt = built
    root = mnt / "wf/a"
    hide = " && ".join(f"mount -t tmpfs none '{d}'" for d in _pythons_to_hide(env))
    script = (
        f"{hide} && test -z \"$(ls '{env.store}')\" && "
        f"{' '.join(NOBODY)} '{root}/bin/python' -c '{PROBE}' '{root}' && "
        f"{' '.join(NOBODY)} '{root}/bin/envfs-demo-tool'"
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "ok (3, 12) hello from base_lib",
        f"tool {root}@1",
    ]


def run_in_bare_chroot(mnt: Path, chroot: Path, argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as nobody in a chroot holding only the host libraries, the mount at /envs."""
    libdir = chroot / "lib/x86_64-linux-gnu"
    for d in (libdir, chroot / "lib64", chroot / "dev", chroot / "proc", chroot / "envs"):
        d.mkdir(parents=True)
    (chroot / "tmp").mkdir(mode=0o1777)
    for name in HOST_LIBS:
        for src in (Path("/lib/x86_64-linux-gnu") / name, Path("/usr/lib/x86_64-linux-gnu") / name):
            if src.exists():
                shutil.copyfile(src, libdir / name)
                break
    shutil.copyfile("/lib64/ld-linux-x86-64.so.2", chroot / "lib64/ld-linux-x86-64.so.2")
    os.chmod(chroot / "lib64/ld-linux-x86-64.so.2", 0o755)
    script = (
        f"mount --rbind /dev '{chroot}/dev' && mount -t proc proc '{chroot}/proc' && "
        f"mount --bind '{mnt}' '{chroot}/envs' && "
        f"chroot --userspec=65534:65534 '{chroot}' {argv}"
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300
    )


def test_env_runs_in_a_bare_chroot_with_the_mount_at_another_path(
    built: tuple[Env, Path], tmp_path: Path
) -> None:
    _env, mnt = built
    out = run_in_bare_chroot(
        mnt, tmp_path / "root", f"/envs/wf/a/bin/python -c '{PROBE}' /envs/wf/a"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok (3, 12) hello from base_lib"


@pytest.mark.network
@pytest.mark.slow
def test_numpy_computes_in_a_bare_chroot(pypi: Env, tmp_path: Path) -> None:
    pypi.vars["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    pypi.run("build", "wf/np", "numpy==2.1.3", "--python", PY)
    mnt = tmp_path / "envs"
    mount = Mount(pypi, mnt)
    try:
        code = "import numpy; print(numpy.linalg.inv(numpy.eye(3) * 2).trace())"
        out = run_in_bare_chroot(mnt, tmp_path / "root", f"/envs/wf/np/bin/python -c '{code}'")
    finally:
        mount.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.5"


def test_nothing_served_names_the_builder_store_or_staging(built: tuple[Env, Path]) -> None:
    env, mnt = built
    root = mnt / "wf/a"
    python = os.path.realpath(root / "bin/python")
    assert python == str(mnt / "wf/a@1/bin/python3.12") and os.path.isfile(python)  # pinned
    source = Path(interpreters.find(PY).path).resolve().parents[1]
    needles = [str(source).encode(), str(env.store).encode()]
    files = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink():
                assert not os.path.isabs(os.readlink(path)), f"{path} links outside the env"
                continue
            data = path.read_bytes()
            files += 1
            for needle in needles:
                assert needle not in data, f"{path} names {needle.decode()}"
    assert files > 1000  # the standard library is served from the mount too


def test_the_task_users_own_site_packages_stay_out(built: tuple[Env, Path], tmp_path: Path) -> None:
    """Like a venv, an env ignores ~/.local/lib/pythonX.Y/site-packages (PYTHONPATH works)."""
    _env, mnt = built
    user_site = tmp_path / "home/.local/lib/python3.12/site-packages"
    user_site.mkdir(parents=True)
    (user_site / "leaked_from_home.py").write_text("")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra/on_pythonpath.py").write_text("")
    code = (
        "import importlib.util as u, site, sys\n"
        "print(site.ENABLE_USER_SITE, u.find_spec('leaked_from_home') is None,"
        " u.find_spec('on_pythonpath') is not None)"
    )
    out = subprocess.run(
        [mnt / "wf/a/bin/python", "-c", code],
        env={"HOME": str(tmp_path / "home"), "PYTHONPATH": str(tmp_path / "extra")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_interpreter_files_are_one_inode_in_every_env(built: tuple[Env, Path]) -> None:
    env, mnt = built
    env.run("build", "wf/b", "extra-b==2.0", "--python", PY)
    a, b = env.show("wf/a"), env.show("wf/b")
    assert a["layout"] == b["layout"] == "self-contained"
    for rel in ("bin/python3.12", "lib/libpython3.12.so.1.0", "lib/python3.12/os.py"):
        sa = os.stat(Path(a["snapshot_path"]) / rel)
        sb = os.stat(Path(b["snapshot_path"]) / rel)
        assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino), rel
        assert sa.st_nlink >= 4  # object pool, interpreter tree, two envs
        ma, mb = os.stat(mnt / "wf/a" / rel), os.stat(mnt / "wf/b" / rel)
        assert ma.st_ino == mb.st_ino, f"{rel} is two inodes through the mount"
    listed = json.loads(env.run("python", "ls", "--json").stdout)
    assert len(listed) == 1 and listed[0]["envs"] == ["wf/a", "wf/b"]
    assert listed[0]["version"].startswith("3.12.") and len(listed[0]["digest"]) == 64


def test_same_interpreter_in_two_stores_gives_one_digest_and_snapshot_id(
    tmp_path: Path, wheelhouse: Path
) -> None:
    """Store one captures on first use (`build`), store two ahead of time (`python add`)."""
    ids = []
    for where, add_first in (("a/store-one", False), ("somewhere/much/deeper/store-two", True)):
        env = make_env(tmp_path / where, wheelhouse, seed=False)
        if add_first:
            added = json.loads(env.run("python", "add", PY, "--json").stdout)
            assert "files" not in added and added["libraries"], added
        env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
        (listed,) = json.loads(env.run("python", "ls", "--json").stdout)
        assert listed["envs"] == ["wf/a"]
        ids.append((listed["digest"], env.show("wf/a")["snapshot_id"]))
    assert ids[0] == ids[1]


def _sections(elf: Path) -> list[str]:
    with open(elf, "rb") as f:
        return [section.name for section in ELFFile(f).iter_sections()]


def test_captured_interpreter_comes_without_debug_sections_and_runs(
    captured_python: Path,
) -> None:
    """pyenv builds with -g (libpython 3.12: 30 MB, 8 MB of it loaded): every node running
    an env would fetch and cache the debug sections. The capture drops them, keeps the
    symbols, and the interpreter still runs."""
    source = Path(os.path.realpath(interpreters.find(PY).path)).parents[1]
    (tree,) = [p for p in (captured_python / "interpreters").iterdir() if p.name != "by-source"]
    libpython = tree / "lib/libpython3.12.so.1.0"
    original = source / "lib" / libpython.name
    if not any(name.startswith(".debug_") for name in _sections(original)):
        pytest.skip(f"{original} carries no debug sections")
    elves = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]
    assert libpython in elves and tree / "bin/python3.12" in elves
    for elf in elves:
        assert not [n for n in _sections(elf) if n.startswith(".debug_")], elf
    assert ".symtab" in _sections(libpython)
    assert libpython.stat().st_size < original.stat().st_size / 2
    out = subprocess.run(
        [tree / "bin/python3.12", "-c", "import decimal, hashlib, ssl; print('ok')"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr


def test_capture_of_an_unresolvable_library_fails_cleanly(tmp_path: Path) -> None:
    source = Path(os.path.realpath(interpreters.find(PY).path)).parents[1]
    fake = tmp_path / "python"
    subprocess.run(["cp", "-al", str(source), str(fake)], check=True, timeout=120)
    module = next((fake / "lib/python3.12/lib-dynload").glob("_bisect.*.so"))
    module.unlink()  # a copy of our own, not a hardlink to the real installation
    shutil.copyfile(next((source / "lib/python3.12/lib-dynload").glob("_bisect.*.so")), module)
    subprocess.run(
        [patchelf_binary(), "--add-needed", "libenvfs-missing.so.1", str(module)], check=True
    )
    env = make_env(tmp_path / "env", None, seed=False)
    out = env.run("python", "add", str(fake / "bin/python3.12"), check=False)
    assert out.returncode == 9, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "libenvfs-missing.so.1" in lines[0] and "_bisect" in lines[0], lines
    assert env.listing("staging") == set()
    assert env.listing("interpreters") == {"by-source"}
    assert env.listing("interpreters/by-source") == set()
    assert env.listing("objects") == set()


def test_snapshot_built_before_capture_is_still_served_as_a_venv(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layout-1 spec (no captured interpreter: a venv over the node's Python) builds,
    serves and says what it is, as stores written before this change hold them."""
    from envfs.build import spec, uv
    from envfs.core.config import Settings
    from envfs.service.envs import Service

    env, mnt, mounts = fs
    for key, value in env.vars.items():
        if key.startswith("UV_"):
            monkeypatch.setenv(key, value)  # builds in this process use the local wheels
    svc = Service(Settings.resolve(env.store, env.index))
    svc.store.ensure()
    old = interpreters.find(PY)
    assert old.digest is None
    files = uv.lock_requirements(svc.store, ["extra-a==1.0"], old)
    sid = spec.snapshot_id(files, old)
    info = SpecInfo(
        snapshot_id=sid,
        kind="requirements",
        requirements=["extra-a==1.0"],
        interpreter=Interpreter(**{**old.model_dump(), "digest": None}),
        layout_version=1,
        lock_sha256=spec.lock_digest(files.lock),
        created=0.0,
        host="old-node",
    )
    svc.store.write_spec(info, files.pyproject, files.lock)
    svc.ensure_built(sid)
    svc.bind("wf", "old", sid)
    assert env.show("wf/old")["layout"] == "venv"
    assert "layout: venv" in env.run("show", "wf/old").stdout
    mounts.append(Mount(env, mnt))
    out = subprocess.run(
        [mnt / "wf/old/bin/python", "-c", "import sys, extra_a; print(sys.prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == str(mnt / "wf/old"), out.stderr
    assert os.path.isabs(os.readlink(mnt / "wf/old/bin/python"))  # the builder's interpreter
    assert "home = " in (mnt / "wf/old/pyvenv.cfg").read_text()
