"""The access trace a build records: which files of the env a first import of its direct
requirements reads, in order (``.envfs/trace.json``, `envfs.store.formats.AccessTrace`).
A fresh node copies those files into its cache in that order, in parallel, as soon as the
env is first used (`envfs.fs.prefetch`), so the job's imports find them on the node
instead of waiting for the NAS one file at a time.

The import runs the packages' own import-time code, so it runs in the build sandbox
(`envfs.build.sandbox`: the build user, a private mount namespace that shows it the env
read-only); isolated (``-I``), with no input and a time limit. Whatever goes wrong, the
build goes on without a trace (serving works without one, only slower on a fresh node).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tomlkit

from envfs.build import sandbox
from envfs.build.relocate import loaded_extent
from envfs.build.uv import BuildLog, uv_binary
from envfs.core.errors import EnvfsError
from envfs.store.files import META
from envfs.store.formats import AccessTrace

#: Seconds the traced import may take.
TRACE_TIMEOUT = 120.0
#: Most files a trace names (the rest are read on demand).
TRACE_MAX = 20_000
#: A traced library's head is noted when what follows it (debug sections) is this big.
HEAD_SPARES = 1 << 20

# Run by the env's own Python: argv[1] the env root, argv[2] the output, argv[3:] the
# distributions to import. Records, in order, every file under the root that the
# interpreter had read or mapped before the hook (the modules it had imported by then: the
# bytecode it read for them, not their sources, which a job's start never opens; the
# site-packages' .pth files, read at start), then each file opened (audit "open" events:
# sources, bytecode, data) and mapped (shared libraries: /proc/self/maps, read at the first
# open after an extension module was loaded, so that a library comes where the import
# needed it, not after the whole package) by the import of each top-level module of those
# distributions.
_SCRIPT = r"""
import importlib, importlib.metadata as md, json, os, re, sys
root, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
order, seen = [], set()
def note(path):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(root + "/") and path not in seen:
        seen.add(path)
        order.append(path[len(root) + 1:])
def maps():
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                note(parts[5].strip())
note(sys.executable)
maps()
for module in list(sys.modules.values()):
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.has_location and spec.origin:  # frozen ones read no file
        cached = spec.cached
        note(cached if cached and os.path.isfile(cached) else spec.origin)
    elif getattr(module, "__file__", None):
        note(module.__file__)
import site
for folder in site.getsitepackages():
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".pth"):
                note(os.path.join(folder, name))
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
want = {norm(n) for n in names}
tops = sorted(m for m, dists in md.packages_distributions().items()
              if m.isidentifier() and any(norm(d) in want for d in dists))
loaded, busy = [len(sys.modules)], [False]
def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes)) or busy[0]:
        return
    names = list(sys.modules)
    fresh, loaded[0] = names[loaded[0]:], len(names)
    if any(str(getattr(sys.modules.get(n), "__file__", "") or "").endswith(".so") for n in fresh):
        busy[0] = True  # maps() opens a file too
        try:
            maps()  # an extension module loaded since: it and the libraries it mapped first
        finally:
            busy[0] = False
    note(args[0])
sys.addaudithook(hook)
for top in tops:
    try:
        importlib.import_module(top)
    except BaseException:
        pass
    maps()
order = [rel for rel in order if os.path.isfile(os.path.join(root, rel))]
with open(out, "w") as f:
    json.dump(order, f)
"""

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def direct_requirements(pyproject: str) -> list[str]:
    """The distribution names ``[project].dependencies`` asks for (what a job imports)."""
    try:
        project = tomlkit.parse(pyproject).get("project") or {}
    except Exception:  # tomlkit's errors have no common base: no names, no trace
        return []
    names = []
    for dep in project.get("dependencies") or []:
        match = _NAME.match(str(dep))
        if match:
            names.append(match.group(1))
    return names


def record_trace(python: str, staged: Path, names: list[str], log: BuildLog) -> AccessTrace | None:
    """Import ``names`` with the staged env's ``python`` (a path inside ``staged``) in the
    build sandbox (`envfs.build.sandbox`: the env read-only, the build user) and write what
    it read to ``staged/.envfs/trace.json``; the trace, or None if there is none."""
    if not names or os.path.relpath(python, staged).startswith(".."):
        return None  # nothing to import, or a venv over the node's interpreter (layout 1)
    log.step(f"access trace: importing {', '.join(names)} to record the files read first")
    os.chmod(staged, 0o755)  # as the snapshot will be (read-only for all)
    try:
        with sandbox.sandbox(python, uv_binary()) as box:
            out = box.scratch / "out" / "trace.json"
            cmd = [box.python, "-I", "-B", "-c", _SCRIPT, box.prefix, str(out), *names]
            proc = box.run_program(cmd, {}, timeout=TRACE_TIMEOUT)
            files = json.loads(out.read_text()) if proc.returncode == 0 else None
    except (OSError, ValueError, EnvfsError) as e:
        log.step(f"access trace: skipped ({type(e).__name__})")
        return None
    if not isinstance(files, list) or not files:
        log.step("access trace: skipped (the import recorded nothing)")
        return None
    traced = [str(f) for f in files if not str(f).startswith(META)][:TRACE_MAX]
    trace = AccessTrace(files=traced, heads=_heads(staged, traced))
    (staged / META / "trace.json").write_text(trace.model_dump_json())
    log.step(f"access trace: {len(trace.files)} files")
    return trace


def _heads(staged: Path, files: list[str]) -> dict[str, int]:
    """The traced shared libraries and executables a job reads only the start of: the bytes
    their loader maps, where what follows is `HEAD_SPARES` or more (libpython with its debug
    sections: 6.7 of 29 MB)."""
    heads = {}
    for rel in files:
        path = staged / rel
        end = loaded_extent(path)
        if end is not None and path.stat().st_size - end >= HEAD_SPARES:
            heads[rel] = end
    return heads
