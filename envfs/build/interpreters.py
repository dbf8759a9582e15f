"""Find the Python interpreters installed on this node (pyenv, PATH, system) without downloads.

uv only sees the active pyenv version and the system Python here, so envfs discovers
interpreters itself and always hands uv an explicit path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from envfs.core.errors import BadInput, InterpreterNotFound
from envfs.store.formats import Interpreter

_PROBE = r"""
import json, platform, sys, sysconfig
libc, libc_version = platform.libc_ver()
plat = sysconfig.get_platform() + (f"-{libc}{libc_version}" if libc else "")
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": platform.python_version(),
    "abi": sysconfig.get_config_var("SOABI") or "",
    "platform": plat,
}))
"""

#: ``3.12``, ``3.12.1``, ``cpython-3.12``: a version request (ASCII digits; never a path).
_REQUEST = re.compile(r"(?:(?P<impl>cpython|python)[-@]?)?(?P<version>3(?:\.[0-9]+){0,2})")
_NAME = re.compile(r"^python3(?:\.\d+)?$")


def is_version_request(request: str) -> bool:
    """Whether ``request`` names a Python version (``3.12``, ``3.12.1``, ``cpython-3.12``),
    exactly, with nothing around it: the only form a remote client may give, since
    anything else (a path) would be run to probe it."""
    return _REQUEST.fullmatch(request) is not None


def _pyenv_root() -> Path | None:
    root = os.environ.get("PYENV_ROOT")
    if root:
        return Path(root)
    default = Path.home() / ".pyenv"
    return default if default.is_dir() else None


def candidates() -> Iterator[Path]:
    """Interpreter executables on this node, pyenv versions first, never pyenv shims."""
    seen: set[Path] = set()
    pyenv = _pyenv_root()
    dirs: list[Path] = []
    if pyenv is not None:
        versions = pyenv / "versions"
        if versions.is_dir():
            dirs += sorted((p / "bin" for p in versions.iterdir()), reverse=True)
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry and "shims" not in Path(entry).parts:
            dirs.append(Path(entry))
    dirs += [Path("/usr/local/bin"), Path("/usr/bin")]
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory), reverse=True)
        except OSError:
            continue
        for name in names:
            if not _NAME.match(name):
                continue
            path = directory / name
            try:
                real = path.resolve()
            except OSError:
                continue
            if real in seen or not os.access(path, os.X_OK):
                continue
            seen.add(real)
            yield path


def run_probe(python: Path, script: str) -> dict[str, Any]:
    """Run ``script`` (which prints one JSON object) in ``python``, isolated and without site."""
    try:
        out = subprocess.run(
            [str(python), "-I", "-S", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise InterpreterNotFound(f"{python} does not run as a Python interpreter") from exc
    if not isinstance(data, dict):
        raise InterpreterNotFound(f"{python} does not run as a Python interpreter")
    return data


def _probe_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "envfs" / "interpreters.json"


def _load_probe_cache() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_probe_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_probe_cache: dict[str, dict[str, str]] | None = None


def probe(path: Path) -> Interpreter:
    """Ask an interpreter what it is exactly (cached by path, size and mtime of its binary)."""
    global _probe_cache
    if _probe_cache is None:
        _probe_cache = _load_probe_cache()
    try:
        st = path.stat()
    except OSError as exc:
        raise InterpreterNotFound(f"{path} does not exist ({exc.strerror})") from exc
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    data = _probe_cache.get(key)
    if data is None:
        data = run_probe(path, _PROBE)
        _probe_cache[key] = data
        cache = _probe_cache_path()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_probe_cache))
            os.replace(tmp, cache)
        except OSError:
            pass  # a cache we cannot write only costs time
    return Interpreter(path=str(path), **data)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find(request: str | None, requires: str | None = None) -> Interpreter:
    """Resolve ``3.12``, ``3.12.1``, ``cpython-3.12`` or a path to one exact interpreter.

    Among several matches the newest patch release wins. ``requires`` (a project's
    ``requires-python``) must hold for the result; with no ``request`` it picks the newest
    installed CPython that satisfies it. ``None`` for both means the minor version envfs
    itself runs on.
    """
    if requires is not None:
        try:
            allowed = SpecifierSet(requires)
        except InvalidSpecifier:
            raise BadInput(f"requires-python {requires!r} is not a version specifier") from None
        if request is None:
            return _newest_in(allowed, requires)
        chosen = find(request)
        if chosen.version not in allowed:
            raise BadInput(
                f"Python {chosen.version} does not satisfy the project's requires-python "
                f"{requires!r}; pass another --python"
            )
        return chosen
    if request is None:
        request = f"{sys.version_info.major}.{sys.version_info.minor}"
    if "/" in request:
        path = Path(request)
        if not path.exists():
            raise InterpreterNotFound(f"no interpreter at {request}; pass an existing path")
        return probe(path)
    match = _REQUEST.fullmatch(request.strip())
    if match is None:
        raise BadInput(f"--python {request!r} is not a version; use e.g. --python 3.12 or a path")
    wanted = match["version"]
    best: Interpreter | None = None
    found: list[str] = []
    for path in candidates():
        name_version = path.name.removeprefix("python")
        # cheap filter before running anything: python3.X must agree with the request
        if name_version.count(".") == 1 and not (
            wanted.startswith(name_version + ".")
            or wanted == name_version
            or name_version.startswith(wanted + ".")
            or name_version == wanted
        ):
            continue
        try:
            interp = probe(path)
        except InterpreterNotFound:
            continue
        found.append(interp.version)
        if interp.implementation != "cpython":
            continue
        matches = interp.version == wanted or interp.version.startswith(wanted + ".")
        if matches and (
            best is None or _version_tuple(interp.version) > _version_tuple(best.version)
        ):
            best = interp
    if best is None:
        have = ", ".join(sorted(set(found), key=_version_tuple)) or "none"
        raise InterpreterNotFound(
            f"Python {wanted} is not installed on this node (found: {have}); "
            f"install it (e.g. `pyenv install {wanted}`) or pass --python /path/to/python"
        )
    return best


#: The oldest Python envs can be built for (captured, relocated and checked on 3.9-3.13;
#: uv and the bytecode tooling need 3.8's successors).
OLDEST = (3, 9)


def check_supported(interp: Interpreter) -> Interpreter:
    """``interp``, or one line (exit 3) if it is older than `OLDEST`."""
    if _version_tuple(interp.version)[:2] < OLDEST:
        oldest = ".".join(map(str, OLDEST))
        raise BadInput(
            f"Python {interp.version} is older than the oldest envfs builds for ({oldest}); "
            f"use --python {oldest} or newer"
        )
    return interp


def _newest_in(allowed: SpecifierSet, text: str) -> Interpreter:
    best: Interpreter | None = None
    for path in candidates():
        try:
            interp = probe(path)
        except InterpreterNotFound:
            continue
        if interp.implementation != "cpython" or interp.version not in allowed:
            continue
        if _version_tuple(interp.version)[:2] < OLDEST:
            continue
        if best is None or _version_tuple(interp.version) > _version_tuple(best.version):
            best = interp
    if best is None:
        raise InterpreterNotFound(
            f"no Python on this node satisfies requires-python {text!r}; install one, or "
            "pass --python"
        )
    return best


def find_exact(want: Interpreter) -> Interpreter:
    """Find an interpreter identical to ``want`` (same version, ABI, platform) on this node."""
    recorded = Path(want.path)
    if recorded.exists():
        try:
            got = probe(recorded)
        except InterpreterNotFound:
            got = None
        if got is not None and got.key == want.key and got.platform == want.platform:
            return got
    got = find(want.version)
    if got.key != want.key or got.platform != want.platform:
        raise InterpreterNotFound(
            f"this node has no interpreter {want.key} ({want.platform}) to build the snapshot; "
            f"install Python {want.version}"
        )
    return got
