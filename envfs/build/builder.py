"""Building snapshots with uv: lock, venv, sync (hardlinked from the shared cache), bytecode,
dedup, manifest. The builder only writes under ``staging/``; ``Store.publish`` makes it live.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from envfs.build import bytecode, sandbox
from envfs.build.packs import write_packs
from envfs.build.spec import Indexes, ProjectFiles
from envfs.build.trace import direct_requirements, record_trace
from envfs.build.tree import (
    DigestCache,
    check_records,
    dedup_into_objects,
    relocate_scripts,
    scan_tree,
    tree_digest,
)
from envfs.build.uv import (
    BuildLog,
    _attempt,
    _crash_while_running,
    _refuse_source_builds,
    _run,
    _succeeded,
    needs_source_build,
    source_builds,
    tool_command,
    uv_binary,
    uv_env,
    uv_version,
)
from envfs.core import crashpoints
from envfs.core.config import node_time
from envfs.core.errors import BuildFailed, EnvironmentProblem
from envfs.store.files import META, remove_tree
from envfs.store.formats import Interpreter, InterpreterInfo, Manifest, Selection
from envfs.store.layout import Store


def build_into(
    store: Store,
    staged: Path,
    files: ProjectFiles,
    interp: Interpreter,
    snapshot_id: str,
    host: str,
    log: BuildLog,
    cache: DigestCache | None = None,
    selection: Selection | None = None,
    indexes: Indexes | None = None,
) -> Manifest:
    """Build the venv of ``files`` into ``staged`` (an empty staging dir) and write its manifest.

    Raises ``BuildFailed`` / ``EnvironmentProblem``; the caller removes ``staged`` on error.
    """
    if os.stat(store.uv_cache).st_dev != os.stat(staged).st_dev:
        raise EnvironmentProblem(
            f"uv cache {store.uv_cache} is on another filesystem than {staged}: "
            "hardlinks are impossible; keep uv-cache inside the store"
        )
    env = uv_env(store, indexes or Indexes())
    selection = selection or Selection()
    uv = uv_binary()
    durations: dict[str, float] = {}
    known: dict[tuple[int, int], str] = {}
    project = staged.parent / f"{staged.name}.project"
    project.mkdir()
    try:
        (project / "pyproject.toml").write_text(files.pyproject)
        (project / "uv.lock").write_text(files.lock)
        t0 = time.monotonic()
        if interp.digest is not None:
            info = store.read_interpreter(interp.digest)
            log.step(f"linking the captured Python {interp.version} ({interp.digest[:12]})")
            known = link_interpreter(store.interpreter_dir(interp.digest), info, staged)
            crashpoints.reached("venv")
            python = str(staged / info.executable)
            compile_dir = staged / info.site_packages
        else:  # layout 1: a venv over the node's interpreter (specs written before capture)
            log.step(f"creating a relocatable venv with Python {interp.version}")
            venv_cmd = [uv, "venv", "--relocatable", "--prompt", "envfs", "--python", interp.path]
            _run([*venv_cmd, "--allow-existing", str(staged)], env, log, "uv venv")
            python = interp.path
            compile_dir = staged / "lib"
        durations["venv"] = time.monotonic() - t0

        t0 = time.monotonic()
        log.step("installing locked packages (uv sync --frozen, hardlinked from the cache)")
        # build code never runs here: uv installs wheels only; an sdist is built into one
        # in the sandbox first (envfs.build.sandbox), unless the policy is wheels-only
        sync_env = dict(env, UV_PROJECT_ENVIRONMENT=str(staged), UV_NO_BUILD="1")
        sync = [uv, "sync", "--frozen", "--no-install-project", "--link-mode", "hardlink"]
        sync += [*selection.sync_args(), "--project", str(project), "--python", python]
        builder_python = python if interp.digest is None else python_of(store, interp.digest)
        stderr = _sync(sync, sync_env, log, files.lock, python, builder_python,
                       indexes or Indexes(), project)  # fmt: skip
        if selection.project_wheel is not None:
            wheel = store.spec_dir(snapshot_id) / selection.project_wheel
            log.step(f"installing the project from {selection.project_wheel} (not editable)")
            with open(wheel, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != selection.project_wheel_sha256:
                    raise BuildFailed(f"{wheel} does not match its sha256 in spec.json")
            install = [uv, "pip", "install", "--no-deps", "--link-mode", "hardlink"]
            install += ["--python", python, str(wheel)]
            stderr += _run(install, sync_env, log, "uv pip install")
        if "falling back" in stderr.lower() and "copy" in stderr.lower():
            raise EnvironmentProblem(
                "uv could not hardlink from its cache and fell back to copies; "
                "keep the store and its uv-cache on one filesystem"
            )
        if interp.digest is not None:
            relocate_scripts(staged, compile_dir)
        durations["sync"] = time.monotonic() - t0
    finally:
        shutil.rmtree(project, ignore_errors=True)

    t0 = time.monotonic()
    if interp.digest is not None:
        log.step("bytecode: reusing what earlier builds compiled, compiling the rest")

        def compile_files(sources: list[Path]) -> None:
            compile_bytecode(python, staged, sources, log)

        stats = bytecode.compile_with_pool(
            store,
            staged,
            compile_dir,
            interp.digest,
            info.tag(),
            compile_files,
            known,
            log.step,
            cached=cache.cached_digest if cache is not None else None,
            learn=cache.remember_digests if cache is not None else None,
        )
        log.step(stats.summary())
    else:
        log.step("compiling bytecode (unchecked-hash, neutral paths)")
        compile_bytecode(python, staged, [compile_dir], log)
    durations["compile"] = time.monotonic() - t0

    t0 = time.monotonic()
    log.step("deduplicating generated files and writing the manifest")
    dedup_into_objects(store, staged, known)
    crashpoints.reached("dedup")
    entries, total = scan_tree(
        staged,
        forbidden=[str(staged).encode(), str(store.staging).encode()],
        known=known,
        cache=cache,
    )
    check_records(staged, entries)
    file_count = sum(e.type == "file" for e in entries)
    log.step(f"manifest: {file_count} files, {len(known)} digests known before the scan")
    durations["manifest"] = time.monotonic() - t0
    manifest = Manifest(
        snapshot_id=snapshot_id,
        tree_digest=tree_digest(entries),
        files=entries,
        file_count=file_count,
        total_bytes=total,
        builder=host,
        uv_version=uv_version(),
        interpreter=interp,
        built_at=node_time(),
        durations=durations,
    )
    meta = staged / META
    meta.mkdir()
    (meta / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    crashpoints.reached("manifest")
    if interp.digest is not None:
        t0 = time.monotonic()
        trace = record_trace(python, staged, direct_requirements(files.pyproject), log)
        if trace is not None:
            index = write_packs(store, staged, trace, manifest)
            packed = sum(len(p.members) for p in index.packs)
            log.step(f"packs: {packed} small traced files in {len(index.packs)} pack(s)")
        durations["trace"] = time.monotonic() - t0
    (meta / "build.log").write_text(log.text())
    return manifest


#: Compiles the files listed in argv[2] as ``compileall -s argv[1] -p /`` would, in parallel
#: (compileall itself compiles files named on its command line one by one).
_COMPILE_FILES = """
import compileall, functools, py_compile, sys
root, listing = sys.argv[1], sys.argv[2]
with open(listing) as f:
    files = f.read().splitlines()
work = functools.partial(
    compileall.compile_file, force=True, quiet=1, stripdir=root, prependdir="/",
    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
)
if len(files) < 64:
    ok = all([work(f) for f in files])
else:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def die_with_parent():  # workers of a killed build must not write on into its tree
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except Exception:
            pass

    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(mp_context=fork, initializer=die_with_parent) as pool:
        ok = all(pool.map(work, files, chunksize=16))
sys.exit(0 if ok else 1)
"""


def compile_bytecode(python: str, root: Path, targets: list[Path], log: BuildLog) -> None:
    """Compile ``targets`` (all files, or all directories) reproducibly: unchecked-hash pycs
    whose paths name no builder dir, in parallel.

    Paths are compiled in relative to ``root`` (``-s root -p /``).  CPython rewrites a code
    object's file name to the real source path at import time, so the neutral name compiled
    in is harmless and keeps the bytes identical on every builder.
    """
    with tempfile.NamedTemporaryFile("w", dir=root.parent, prefix=".compile-", suffix=".txt") as f:
        f.write("".join(f"{t}\n" for t in targets))
        f.flush()
        # -B: the compiler's own imports must not leave timestamp pycs that compileall keeps
        if all(t.is_dir() for t in targets):
            cmd = [python, "-I", "-B", "-m", "compileall", "-q", "-j", "0", "-s", str(root)]
            cmd += ["-p", "/", "--invalidation-mode", "unchecked-hash", *map(str, targets)]
        else:
            cmd = [python, "-I", "-B", "-c", _COMPILE_FILES, str(root), f.name]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": "0"}
        _crash_while_running("compile", cmd, env)
        proc = subprocess.run(
            tool_command(cmd), capture_output=True, text=True, env=env, check=False
        )
    log.output(proc.stdout + proc.stderr)
    # compileall exits 1 if any file fails to compile (some packages ship py2-only tests);
    # those files simply stay uncompiled.
    if proc.returncode not in (0, 1):
        raise BuildFailed(f"compiling bytecode failed: {proc.stderr.strip()[-300:]}")


def _sync(
    sync: list[str],
    env: dict[str, str],
    log: BuildLog,
    lock: str,
    python: str,
    builder_python: str,
    indexes: Indexes,
    scratch: Path,
) -> str:
    """``uv sync`` with no source build; packages that need one are built into wheels in
    the sandbox, then installed (wheels only) after the others."""
    code, output = _attempt(sync, env, log, "sync")
    if code == 0 or not needs_source_build(output):
        return _succeeded(code, output, "uv sync")
    names = source_builds(output)
    if indexes.no_build or not names:
        _refuse_source_builds(output)
        raise BuildFailed("uv sync failed: a package needs a source build")
    log.step(f"building {', '.join(names)} from source, unprivileged (sandboxed)")
    wheels_dir = scratch / "wheels"
    wheels_dir.mkdir()
    wheels = sandbox.build_wheels(builder_python, uv_binary(), lock, names, env, wheels_dir)
    rest = [*sync, *(a for n in names for a in ("--no-install-package", n))]
    out = _run(rest, env, log, "uv sync")
    install = [uv_binary(), "pip", "install", "--no-deps", "--link-mode", "hardlink"]
    out += _run([*install, "--python", python, *map(str, wheels)], env, log, "uv pip install")
    return out


def python_of(store: Store, digest: str) -> str:
    """The executable of a captured interpreter in the store (what sandboxed builds run)."""
    return str(store.interpreter_dir(digest) / store.read_interpreter(digest).executable)


def link_interpreter(source: Path, info: InterpreterInfo, dest: Path) -> dict[tuple[int, int], str]:
    """Hardlink a captured interpreter's tree into ``dest`` (directories made writable).

    Returns the digest of every linked file by (device, inode): the manifest reuses them.
    """
    known: dict[tuple[int, int], str] = {}
    for entry in info.files:  # sorted by path: a directory comes before its entries
        target = dest / entry.path
        if entry.type == "dir":
            target.mkdir(mode=0o755)
        elif entry.type == "symlink":
            os.symlink(entry.target or "", target)
        else:
            os.link(source / entry.path, target)
            st = os.lstat(target)
            if entry.sha256 is not None:
                known[(st.st_dev, st.st_ino)] = entry.sha256
    return known


def remove_staged(staged: Path) -> None:
    with contextlib.suppress(OSError):
        remove_tree(staged)
