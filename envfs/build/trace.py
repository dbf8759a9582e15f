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
from envfs.build.uv import BuildLog, uv_binary
from envfs.core.errors import EnvfsError
from envfs.store.files import META
from envfs.store.formats import AccessTrace, Range

#: Seconds the traced import may take.
TRACE_TIMEOUT = 120.0
#: Most files a trace names (the rest are read on demand).
TRACE_MAX = 20_000
#: The smallest mapped file whose touched ranges a trace notes.
RANGES_MIN = 1 << 20
#: Touched ranges closer than this are noted as one.
RANGES_GAP = 64 << 10

# Run by the env's own Python: argv[1] the env root, argv[2] the output, argv[3:] the
# distributions to import. Records, in order, every file under the root that the
# interpreter had read or mapped before the hook: first what its start read (the executable,
# libpython, the bytecode of the modules it imported, not their sources, which a job's start
# never opens, nor frozen modules' files; the site-packages' .pth files), then the files of
# the modules this script imported; then each file opened (audit "open" events:
# sources, bytecode, data) and mapped (shared libraries: /proc/self/maps, read at the first
# open after an extension module was loaded, so that a library comes where the import
# needed it, not after the whole package) by the import of each top-level module of those
# distributions; and at the end, of each file mapped, the pages it touched (those present in
# the process's page table, /proc/self/pagemap).
_SCRIPT = r"""
import sys
early = list(sys.modules)  # what the interpreter's start imported, before this script's own
with open("/proc/self/maps") as f:
    early_maps = f.read()  # the libraries the start mapped (libpython)
import importlib, importlib.metadata as md, json, os, re
root, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
order, seen = [], set()
def note(path):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(root + "/") and path not in seen:
        seen.add(path)
        order.append(path[len(root) + 1:])
def maps(text=None):
    if text is None:
        with open("/proc/self/maps") as f:
            text = f.read()
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            note(parts[5].strip())
def note_module(module):
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.has_location and spec.origin:
        cached = spec.cached
        note(cached if cached and os.path.isfile(cached) else spec.origin)
    elif getattr(module, "__file__", None) and getattr(spec, "origin", None) != "frozen":
        note(module.__file__)  # (a frozen module's file is never read: it is in libpython)
note(sys.executable)
maps(early_maps)
for name in early:
    note_module(sys.modules.get(name))
import site
for folder in site.getsitepackages():
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".pth"):
                note(os.path.join(folder, name))
maps()
for module in list(sys.modules.values()):  # this script's own imports (a job may import them)
    note_module(module)
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
page, touched = os.sysconf("SC_PAGE_SIZE"), {}
try:  # the pages of each mapped file the import touched: present in this process's page table
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            path = os.path.abspath(parts[5].strip()) if len(parts) == 6 else ""
            if not path.startswith(root + "/"):
                continue
            low, high = (int(x, 16) for x in parts[0].split("-"))
            pm.seek(low // page * 8)
            table = pm.read((high - low) // page * 8)
            pages = touched.setdefault(path[len(root) + 1:], set())
            first = int(parts[2], 16) // page
            pages.update(first + i for i in range(len(table) // 8) if table[i * 8 + 7] & 0x80)
except OSError:
    touched = {}
with open(out, "w") as f:
    pages = {rel: sorted(numbers) for rel, numbers in touched.items()}
    json.dump({"files": order, "pages": pages, "page": page}, f)
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
            got = json.loads(out.read_text()) if proc.returncode == 0 else None
    except (OSError, ValueError, EnvfsError) as e:
        log.step(f"access trace: skipped ({type(e).__name__})")
        return None
    files = got.get("files") if isinstance(got, dict) else None
    if not isinstance(files, list) or not files:
        log.step("access trace: skipped (the import recorded nothing)")
        return None
    traced = [str(f) for f in files if not str(f).startswith(META)][:TRACE_MAX]
    assert isinstance(got, dict)
    trace = AccessTrace(files=traced, ranges=_ranges(staged, traced, got))
    (staged / META / "trace.json").write_text(trace.model_dump_json())
    log.step(f"access trace: {len(trace.files)} files")
    return trace


def _ranges(staged: Path, files: list[str], got: dict[str, object]) -> dict[str, list[Range]]:
    """Of the traced files of `RANGES_MIN` or more the import mapped and touched a part
    of, that part: byte ranges, pieces closer than `RANGES_GAP` joined, the file's first
    page always in (its loader reads the headers)."""
    page, pages = got.get("page"), got.get("pages")
    if not isinstance(page, int) or not isinstance(pages, dict):
        return {}
    ranges: dict[str, list[Range]] = {}
    for rel in files:
        touched = pages.get(rel)
        if not isinstance(touched, list):
            continue  # not mapped: no stat of it
        size = (staged / rel).stat().st_size
        if size < RANGES_MIN:
            continue
        spans: list[Range] = [(0, min(page, size))]
        for number in sorted({n for n in touched if isinstance(n, int)}):
            start, end = number * page, min((number + 1) * page, size)
            if start >= size:
                continue
            if start - spans[-1][1] < RANGES_GAP:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((start, end))
        if sum(end - start for start, end in spans) < size:
            ranges[rel] = spans
    return ranges
