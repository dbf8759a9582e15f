"""Capture a local CPython installation into the store: once, content-addressed, relocatable.

``interpreters/<digest>/`` holds a complete, relocatable prefix::

    bin/python3.X            the interpreter (run path $ORIGIN/../lib)
    bin/python, bin/python3  relative symlinks to it
    lib/libpython3.X.so.1.0  when the installation is a shared build
    lib/python3.X/           the standard library, bytecode compiled unchecked-hash, no tests
    lib/python3.X/site-packages/00-envfs-no-user-site.pth   the user site off, as in a venv
    lib/python3.X/site-packages/   empty: the locked packages of an env go here
    lib/envfs-libs/          shared libraries beyond glibc/libgcc_s/libstdc++/libz
    include/python3.X/       headers (for packages built from source)
    .envfs/interpreter.json  what it is (`InterpreterInfo`), its files and digests

The digest is sha256 over the relocated tree (paths, types, modes, contents; the bytecode
left out, as it is derived from the sources by this very interpreter), so the same installation
gives the same digest in any store, at any path.  A snapshot's prefix is this tree hardlinked
plus the env's packages; every file is one inode in the store, whatever the number of envs.

The installation's own ELF files lose their debug sections on the way in (`strip_debug`:
libpython 3.12 from pyenv 30 -> 8 MB), so the digest also depends on the host's binutils.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from envfs.build.builder import compile_bytecode
from envfs.build.interpreters import probe, run_probe
from envfs.build.relocate import (
    PLACEHOLDER,
    closure_problems,
    is_elf,
    relocate_elves,
    replace_prefix,
    strip_debug,
)
from envfs.build.tree import scan_tree, tree_digest
from envfs.build.uv import BuildLog
from envfs.core.config import node_time
from envfs.core.errors import BadInput, BuildFailed, CaptureFailed
from envfs.store.files import META, regular_files, remove_tree
from envfs.store.formats import Interpreter, InterpreterInfo
from envfs.store.layout import Store

Progress = Callable[[str], None]

#: Bumped when the captured tree changes for the same installation (a new digest follows).
CAPTURE_VERSION = 2

_LAYOUT_PROBE = r"""
import json, os, sys, sysconfig
paths = sysconfig.get_paths()
cv = sysconfig.get_config_var
print(json.dumps({
    "prefix": os.path.realpath(sys.base_prefix),
    "executable": os.path.realpath(sys.executable),
    "stdlib": os.path.realpath(paths["stdlib"]),
    "platstdlib": os.path.realpath(paths["platstdlib"]),
    "include": os.path.realpath(paths["include"]),
    "libdir": cv("LIBDIR") or "",
    "ldlibrary": cv("LDLIBRARY") or "",
    "instsoname": cv("INSTSONAME") or "",
    "shared": bool(cv("Py_ENABLE_SHARED")),
    "cache_tag": sys.implementation.cache_tag or "",
}))
"""

#: Parts of the standard library a served env does not need: the test suite, tests of single
#: packages, and third-party packages of the source installation.
_SKIP_DIRS = frozenset(
    {
        "test",
        "site-packages",
        "dist-packages",
        "idlelib/idle_test",
        "lib2to3/tests",
        "tkinter/test",
        "unittest/test",
        "ctypes/test",
        "sqlite3/test",
        "distutils/tests",
    }
)
_SKIP_SUFFIXES = (".pyc", ".pyo", ".a", ".o")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a CPython installation keeps its parts (absolute, symlinks resolved)."""

    prefix: Path
    executable: Path
    stdlib: Path
    include: Path
    libpython: Path | None  # the shared library, if a shared build
    ldlibrary: str  # its link name, e.g. libpython3.12.so
    cache_tag: str  # sys.implementation.cache_tag, e.g. cpython-312

    @property
    def stdlib_rel(self) -> str:
        return str(self.stdlib.relative_to(self.prefix))


def read_layout(python: Path) -> Layout:
    """Ask an interpreter where its parts are; refuse what cannot be captured as a prefix."""
    data = run_probe(python, _LAYOUT_PROBE)
    prefix = Path(data["prefix"])
    executable = Path(data["executable"])
    stdlib = Path(data["stdlib"])
    if str(prefix) in ("/", "/usr") or data["platstdlib"] != data["stdlib"]:
        raise BadInput(
            f"{python} is a distribution Python spread over {prefix}; capture a CPython "
            "installed under its own prefix (pyenv, python.org source build, "
            "python-build-standalone)"
        )
    for part in (executable, stdlib):
        if not part.is_relative_to(prefix):
            raise BadInput(f"{python}: {part} is outside its prefix {prefix}; cannot capture it")
    libpython = None
    if data["shared"] and data["instsoname"]:
        candidate = Path(os.path.realpath(Path(data["libdir"]) / data["instsoname"]))
        if not candidate.is_file():
            raise CaptureFailed(f"{python} is a shared build but {candidate} does not exist")
        libpython = candidate
    return Layout(
        prefix,
        executable,
        stdlib,
        Path(data["include"]),
        libpython,
        data["ldlibrary"],
        data["cache_tag"],
    )


def source_key(interp: Interpreter) -> str:
    """Names one local installation (path, binary size and mtime, what it is) in the store."""
    path = os.path.realpath(interp.path)
    st = os.stat(path)
    blob = json.dumps(
        [CAPTURE_VERSION, path, st.st_size, st.st_mtime_ns, interp.key, interp.platform]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def ensure_captured(
    store: Store, interp: Interpreter, host: str, progress: Progress | None = None
) -> Interpreter:
    """``interp`` as captured into ``store`` (captured now if it is not yet): digest set."""
    key = source_key(interp)
    digest = store.interpreter_for_source(key)
    if digest is None:
        info = capture(store, Path(interp.path), host, progress)
        store.record_interpreter_source(key, info.digest)
        digest = info.digest
    return interp.model_copy(update={"digest": digest})


def capture(
    store: Store, python: Path, host: str, progress: Progress | None = None
) -> InterpreterInfo:
    """Copy, relocate, compile, check and publish an installation; its `InterpreterInfo`.

    Raises `CaptureFailed` (a library that cannot be resolved, a path that stays in the tree)
    with nothing of the capture left in the store.
    """
    say = progress or (lambda _m: None)
    interp = probe(python)
    if interp.implementation != "cpython":
        raise BadInput(f"{python} is {interp.implementation}; envfs captures CPython only")
    layout = read_layout(Path(os.path.realpath(python)))
    say(f"capturing Python {interp.version} from {layout.prefix} into the store (once)")
    store.ensure()
    with store.gc_fence():  # a sweep takes every staging dir it sees for a crashed build's
        return _capture_fenced(store, interp, layout, host, say)


def _capture_fenced(
    store: Store, interp: Interpreter, layout: Layout, host: str, say: Progress
) -> InterpreterInfo:
    """Capture in a node-local scratch dir (the copy, relocation, compile and scan read and
    write every file several times: on a NAS that would be minutes of round trips), then
    write the finished tree into the store once, in parallel."""
    scratch = Path(tempfile.mkdtemp(prefix="envfs-capture-"))
    try:
        return _capture_in(store, interp, layout, host, say, scratch / "python")
    finally:
        remove_tree(scratch)


def _capture_in(
    store: Store, interp: Interpreter, layout: Layout, host: str, say: Progress, tree: Path
) -> InterpreterInfo:
    tree.mkdir()
    sources, libpython = _copy_installation(layout, tree)
    (tree / layout.stdlib_rel / "site-packages" / NO_USER_SITE_PTH).write_text(NO_USER_SITE)
    saved = strip_debug(sorted(sources))
    if saved:
        say(f"dropped {saved / 1e6:.1f} MB of debug sections from {len(sources)} ELF files")
    say(f"relocating {len(sources)} ELF files")
    elves, bundled = relocate_elves(tree, sources, libpython)
    old = sorted({str(layout.prefix).encode(), os.path.realpath(layout.prefix).encode()})
    elf_set = set(elves)
    for path, _st in list(regular_files(tree)):
        replace_prefix(path, old, PLACEHOLDER.encode(), binary=path in elf_set)
    problems = closure_problems(tree, elves)
    if problems:
        raise CaptureFailed(f"relocation incomplete: {problems[0]}")
    say("compiling the standard library (unchecked-hash bytecode)")
    exe = tree / "bin" / layout.executable.name
    log = BuildLog(None, store.root)
    compile_bytecode(str(exe), tree, [tree / layout.stdlib_rel], log)
    _check_runs(exe, tree)
    try:  # one read of the tree: digests, and no file naming the source or staging dir
        entries, total = scan_tree(tree, forbidden=[str(tree).encode(), *old])
    except BuildFailed as exc:
        raise CaptureFailed(f"relocation incomplete: {exc.message}") from exc
    sources_only = [e for e in entries if "__pycache__" not in e.path.split("/")]
    rel_site = f"{layout.stdlib_rel}/site-packages"
    info = InterpreterInfo(
        digest=tree_digest(sources_only),
        implementation=interp.implementation,
        version=interp.version,
        abi=interp.abi,
        platform=interp.platform,
        executable=f"bin/{layout.executable.name}",
        stdlib=layout.stdlib_rel,
        site_packages=rel_site,
        cache_tag=layout.cache_tag,
        libraries=bundled,
        file_count=sum(e.type == "file" for e in entries),
        total_bytes=total,
        files=entries,
        source=str(layout.prefix),
        host=host,
        captured_at=node_time(),
    )
    if store.interpreter_ready(info.digest):
        say(f"interpreter {info.digest[:12]} was already in the store")
        return store.read_interpreter(info.digest)
    say(f"writing {info.file_count} files into the store")
    staged = store.new_interpreter_staging(host)
    try:
        store.receive_tree(tree, staged, entries)
        meta = staged / META
        meta.mkdir()
        (meta / "interpreter.json").write_text(info.model_dump_json(indent=1))
        if not store.publish_interpreter(staged, info.digest):
            return store.read_interpreter(info.digest)
    except BaseException:
        remove_tree(staged)
        raise
    store.audit(
        "interpreter_captured",
        host,
        None,
        interpreter=info.digest,
        version=info.version,
        source=info.source,
        libraries=info.libraries,
    )
    say(f"captured Python {info.version} as {info.digest[:12]}")
    return info


def _copy_installation(layout: Layout, tree: Path) -> tuple[dict[Path, Path], Path | None]:
    """Copy the parts of the installation into ``tree``; the ELF files (copy -> original)."""
    elves: dict[Path, Path] = {}
    (tree / "bin").mkdir()
    exe = tree / "bin" / layout.executable.name
    _copy_file(layout.executable, exe, elves)
    version = layout.stdlib.name.removeprefix("python")  # "3.12" (or "3.13t")
    for alias in ("python", "python3", f"python{version}"):
        if alias != exe.name:
            os.symlink(exe.name, tree / "bin" / alias)
    _copy_dir(layout.stdlib, tree / layout.stdlib_rel, layout.prefix, elves)
    (tree / layout.stdlib_rel / "site-packages").mkdir()
    if layout.include.is_dir() and layout.include.is_relative_to(layout.prefix):
        _copy_dir(layout.include, tree / layout.include.relative_to(layout.prefix), None, elves)
    libpython = None
    if layout.libpython is not None:
        libpython = tree / "lib" / layout.libpython.name
        _copy_file(layout.libpython, libpython, elves)
        if layout.ldlibrary and layout.ldlibrary != libpython.name:
            os.symlink(libpython.name, tree / "lib" / layout.ldlibrary)
        stable = layout.libpython.parent / "libpython3.so"
        if stable.is_file() and stable.name != libpython.name:
            _copy_file(stable, tree / "lib" / stable.name, elves)
    return elves, libpython


#: A ``.pth`` line in the interpreter's (otherwise empty) site-packages: keeps the task
#: user's ``~/.local/lib/pythonX.Y/site-packages`` off ``sys.path``, as a venv does.  Not a
#: ``pyvenv.cfg``: Python anchors ``sys.prefix`` at the unresolved path of a venv, which would
#: undo the pinning of a process to one revision (see `envfs.fs.vfs`).  Not a patched
#: ``site.py``: 3.11+ runs a frozen copy.  ``site`` adds the user site before it reads the
#: ``.pth`` files of site-packages, so this takes it out again and skips usercustomize.
NO_USER_SITE = (
    "import sys, site; site.ENABLE_USER_SITE = False; "
    "site.USER_SITE in sys.path and sys.path.remove(site.USER_SITE)\n"
)  # one statement line, no comprehension: 3.11 runs it in a scope a comprehension cannot see
NO_USER_SITE_PTH = "00-envfs-no-user-site.pth"


def _copy_file(src: Path, dest: Path, elves: dict[Path, Path]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    executable = os.stat(src).st_mode & 0o111
    os.chmod(dest, 0o755 if executable else 0o644)
    if is_elf(dest):
        elves[dest] = src


def _copy_dir(src: Path, dest: Path, prefix: Path | None, elves: dict[Path, Path]) -> None:
    """Copy a directory of the installation, without tests, bytecode and static libraries."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = sorted(
            d for d in dirnames if d != "__pycache__" and os.path.join(rel_dir, d) not in _SKIP_DIRS
        )
        target_dir = dest / rel_dir
        target_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(target_dir, 0o755)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]):
            path = Path(dirpath, name)
            if name.endswith(_SKIP_SUFFIXES):
                continue
            target = target_dir / name
            if path.is_symlink():
                _copy_symlink(path, target, prefix, elves)
            elif path.is_file():
                _copy_file(path, target, elves)
        dirnames[:] = [d for d in dirnames if not os.path.islink(Path(dirpath, d))]


def _copy_symlink(path: Path, target: Path, prefix: Path | None, elves: dict[Path, Path]) -> None:
    """Keep a link that stays inside the installation (made relative); copy any other file."""
    link = os.readlink(path)
    resolved = Path(os.path.realpath(path))
    if not os.path.isabs(link) and prefix is not None and resolved.is_relative_to(prefix):
        os.symlink(link, target)
    elif prefix is not None and resolved.is_relative_to(prefix) and resolved.exists():
        os.symlink(os.path.relpath(resolved, path.parent), target)
    elif resolved.is_file():
        _copy_file(resolved, target, elves)


def _check_runs(exe: Path, tree: Path) -> None:
    """The relocated interpreter starts and takes its own tree as its prefix."""
    proc = subprocess.run(
        [str(exe), "-I", "-B", "-c", "import sys, encodings; print(sys.prefix, sys.base_prefix)"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    want = f"{tree} {tree}"
    if proc.returncode != 0 or proc.stdout.strip() != want:
        detail = (proc.stderr.strip().splitlines() or [proc.stdout.strip()])[-1:]
        raise CaptureFailed(f"the relocated interpreter does not start from the store: {detail}")
