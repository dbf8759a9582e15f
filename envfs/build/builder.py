"""Building snapshots with uv: lock, venv, sync (hardlinked from the shared cache), bytecode,
dedup, manifest. The builder only writes under ``staging/``; ``Store.publish`` makes it live.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from envfs.build import bytecode
from envfs.build.spec import Indexes, ProjectFiles, render_pyproject
from envfs.core import crashpoints
from envfs.core.config import node_time
from envfs.core.errors import BadInput, BuildFailed, EnvironmentProblem
from envfs.model import Interpreter, InterpreterInfo, Manifest, ManifestEntry, Selection
from envfs.store.files import META, remove_tree
from envfs.store.layout import Store
from envfs.store.wheel import record_digests

Progress = Callable[[str], None]

#: Children (uv, the bytecode compiler) get SIGKILL when the builder dies, so a killed build
#: leaves no orphan writing into its staging dir after the next builder cleaned it away.
_DIE_WITH_US = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def tool_command(cmd: list[str]) -> list[str]:
    """``cmd`` made to die with this process (``setpriv --pdeathsig``, where there is one)."""
    return [*_DIE_WITH_US, *cmd]


def _crash_while_running(phase: str, cmd: list[str], env: dict[str, str]) -> None:
    """Crash point of a phase that runs a tool: start the tool, then die (see crashpoints)."""
    if crashpoints.armed(phase):
        quiet = subprocess.DEVNULL
        subprocess.Popen(tool_command(cmd), env=env, stdout=quiet, stderr=quiet)
        time.sleep(0.2)
    crashpoints.reached(phase)


def uv_binary() -> str:
    """The uv executable: ``ENVFS_UV``, then PATH, then the one next to our interpreter."""
    explicit = os.environ.get("ENVFS_UV")
    if explicit:
        return explicit
    found = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    if found is None:
        found = shutil.which("uv", path=os.path.expanduser("~/.local/bin"))
    if found is None:
        raise EnvironmentProblem("uv is not installed; run scripts/setup or `pip install uv`")
    return found


#: uv's variables naming indexes: the CLI turns them into a spec's indexes (so the id covers
#: them); locks and builds of a requirement list then use only those.
INDEX_VARS = ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX")


def uv_env(store: Store, indexes: Indexes | None = None) -> dict[str, str]:
    """The environment every uv call runs in: shared cache, hardlinks, no downloads; with
    ``indexes``, those indexes' credentials and no index variables of the caller's."""
    env = dict(os.environ)
    for var in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "UV_COMPILE_BYTECODE", "PYTHONPATH"):
        env.pop(var, None)
    if indexes is not None:
        for var in INDEX_VARS:
            env.pop(var, None)
        env.update(indexes.secrets)
    env.update(
        UV_CACHE_DIR=str(store.uv_cache),
        UV_LINK_MODE="hardlink",
        UV_PYTHON_DOWNLOADS="never",
        UV_NO_PROGRESS="1",
    )
    return env


def uv_version() -> str:
    out = subprocess.run([uv_binary(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().removeprefix("uv ").split()[0] if out.stdout else "unknown"


def _uv_error(stderr: str) -> str:
    """The most telling line of a uv failure: its innermost cause, else its error line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for prefix in ("cause:", "\u2570\u2500\u25b6", "error:", "\u00d7"):  # uv's plain and fancy
        found = [ln for ln in lines if ln.startswith(prefix)]
        if found:
            return found[-1].removeprefix(prefix).strip()
    return lines[-1] if lines else "uv failed without a message"


#: How uv's top-level error starts when the index could not be reached (its ``cause:`` lines
#: below may name packages, so only this line is looked at).
_UV_NETWORK_ERRORS = (
    "Request failed",
    "Failed to fetch",
    "Failed to download",
    "Could not connect",
)


#: How uv reports ENOSPC (an OS error code, not text a package name could contain).
_UV_DISK_FULL = "(os error 28)"


def _uv_network_failure(stderr: str) -> bool:
    """Whether uv failed to reach the index, from the structure of its output."""
    for line in map(str.strip, stderr.splitlines()):
        for prefix in ("error:", "\u00d7"):
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip().startswith(_UV_NETWORK_ERRORS)
    return False


def _uv_hint(stderr: str) -> str:
    """uv's own ``hint:`` line, kept when its error is passed on."""
    for line in stderr.splitlines():
        if line.strip().startswith("hint:"):
            return f" (hint: {line.strip().removeprefix('hint:').strip()})"
    return ""


def python_path(store: Store, interp: Interpreter) -> str:
    """The interpreter to run for ``interp``: its captured copy in the store, if it has one."""
    if interp.digest is not None:
        info = store.read_interpreter(interp.digest)
        return str(store.interpreter_dir(interp.digest) / info.executable)
    return interp.path


def lock_requirements(
    store: Store,
    reqs: list[str],
    interp: Interpreter,
    seed: str | None = None,
    offline_first: bool = False,
    indexes: Indexes | None = None,
) -> ProjectFiles:
    """Write a pyproject for ``reqs`` with tomlkit and lock it with uv (nothing else written).

    ``seed``: a known lock of a similar list; uv keeps the versions it names where they
    still fit, so the new env differs from that one only where the list does.
    ``offline_first``: try with uv's cache alone (no index round trips) before going online.
    """
    indexes = indexes or Indexes()
    pyproject = render_pyproject(reqs, interp, indexes)
    with tempfile.TemporaryDirectory(dir=store.staging, prefix=".lock-") as tmp:
        (Path(tmp) / "pyproject.toml").write_text(pyproject)
        if seed is not None:
            (Path(tmp) / "uv.lock").write_text(seed)
        cmd = [uv_binary(), "lock", "--project", tmp, "--python", python_path(store, interp)]
        env = uv_env(store, indexes)
        _crash_while_running("lock", cmd, env)
        proc = None
        if offline_first:
            offline = tool_command([*cmd, "--offline"])
            proc = subprocess.run(offline, capture_output=True, text=True, env=env, check=False)
        if proc is None or proc.returncode != 0:
            proc = subprocess.run(
                tool_command(cmd), capture_output=True, text=True, env=env, check=False
            )
        if proc.returncode != 0:
            reason = _uv_error(proc.stderr) + _uv_hint(proc.stderr)
            if _uv_network_failure(proc.stderr):
                raise EnvironmentProblem(f"cannot reach the package index: {reason}")
            if _UV_DISK_FULL in proc.stderr:
                raise EnvironmentProblem(f"the store is full: {reason}")
            if "401 Unauthorized" in proc.stderr or "403 Forbidden" in proc.stderr:
                raise EnvironmentProblem(
                    f"the package index refused access: {reason}; give credentials in the "
                    "URL (never stored), as UV_INDEX_ENVFS_DEFAULT_USERNAME/_PASSWORD "
                    "(ENVFS_EXTRA_1, ... for extra indexes) or in ~/.netrc"
                )
            raise BadInput(f"cannot resolve the requirements: {reason}")
        return ProjectFiles(pyproject=pyproject, lock=(Path(tmp) / "uv.lock").read_text())


def check_lock(store: Store, project: Path, interp: Interpreter) -> None:
    """Refuse a project whose ``uv.lock`` does not match its ``pyproject.toml``, as
    ``uv sync --locked`` would: envfs builds a project exactly as locked (uv's cache first,
    the index only if the cache cannot tell)."""
    cmd = [uv_binary(), "lock", "--check", "--project", str(project)]
    cmd += ["--python", python_path(store, interp)]
    env = uv_env(store)
    proc = subprocess.run([*cmd, "--offline"], capture_output=True, text=True, env=env)
    if proc.returncode != 0 and "needs to be updated" not in proc.stderr:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 0:
        return
    if _uv_network_failure(proc.stderr):
        raise EnvironmentProblem(f"cannot reach the package index: {_uv_error(proc.stderr)}")
    raise BadInput(
        f"{project}/uv.lock does not match its pyproject.toml ({_uv_error(proc.stderr)}); "
        "run `uv lock` in it: envfs builds a project exactly as locked"
    )


def build_project_wheel(store: Store, project: Path, interp: Interpreter, out: Path) -> Path:
    """Build ``project`` into one wheel in ``out`` with ``uv build`` (``--install-project``:
    the env gets the project itself, not editable, so it never reads the project's tree)."""
    cmd = [uv_binary(), "build", "--wheel", "--out-dir", str(out), "--project", str(project)]
    cmd += ["--python", python_path(store, interp), str(project)]
    proc = subprocess.run(
        tool_command(cmd), capture_output=True, text=True, env=uv_env(store), check=False
    )
    wheels = sorted(out.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        if _uv_network_failure(proc.stderr):
            raise EnvironmentProblem(f"cannot reach the package index: {_uv_error(proc.stderr)}")
        raise BadInput(f"cannot build {project} into a wheel: {_uv_error(proc.stderr)}")
    return wheels[0]


class BuildLog:
    """The build log: kept with the snapshot (``.envfs/build.log``) or the failure record."""

    def __init__(self, progress: Progress | None, store_root: Path) -> None:
        self.lines: list[str] = []
        self.progress = progress
        self.store_root = str(store_root)

    def step(self, message: str, show: bool = True) -> None:
        self.lines.append(f"[{time.strftime('%H:%M:%S')}] {message}")
        if show and self.progress is not None:
            self.progress(message)

    def output(self, text: str) -> None:
        self.lines.extend(text.rstrip().splitlines())

    def text(self) -> str:
        """The log with the store's path replaced by ``<store>``: the snapshot names no builder."""
        return ("\n".join(self.lines) + "\n").replace(self.store_root, "<store>")


def _run(cmd: list[str], env: dict[str, str], log: BuildLog, what: str, phase: str = "") -> str:
    """Run uv; its output goes to the build log and, line by line, to the progress."""
    log.step(f"$ {' '.join(cmd)}", show=False)
    proc = subprocess.Popen(
        tool_command(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    if phase:
        crashpoints.reached(phase)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if log.progress is not None and line.strip():
            log.progress(f"uv: {line.strip()}")
    output = "".join(lines)
    log.output(output)
    if proc.wait() != 0:
        if _UV_DISK_FULL in output:
            raise EnvironmentProblem(f"the store is full: {what} failed: {_uv_error(output)}")
        raise BuildFailed(f"{what} failed: {_uv_error(output)}")
    return output


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
        sync_env = dict(env, UV_PROJECT_ENVIRONMENT=str(staged))
        sync = [uv, "sync", "--frozen", "--no-install-project", "--link-mode", "hardlink"]
        sync += [*selection.sync_args(), "--project", str(project), "--python", python]
        stderr = _run(sync, sync_env, log, "uv sync", "sync")
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


#: How uv makes a console script relocatable: ``/bin/sh`` runs the interpreter next to the
#: script's real path, which then reads the rest of the file as Python.
_TRAMPOLINE = (
    "#!/bin/sh\n"
    '\'\'\'exec\' "$(dirname -- "$(realpath -- "$0")")"/\'{python}\' "$0" "$@"\n'
    "' '''\n"
)


def relocate_scripts(prefix: Path, site_packages: Path) -> list[str]:
    """Give console scripts that name ``prefix`` in their shebang a relocatable trampoline.

    An installer writes ``#!<prefix>/bin/python`` into the scripts of a non-venv prefix; the
    trampoline finds the interpreter next to the script wherever the env is served.  The
    wheels' RECORDs are updated to the new contents.  Returns the scripts rewritten.
    """
    bin_dir = prefix / "bin"
    rewritten: dict[str, bytes] = {}
    for entry in sorted(os.scandir(bin_dir), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            continue
        with open(entry.path, "rb") as f:
            data = f.read()
        found = _script_header(data, str(prefix).encode())
        if found is None:
            continue
        python, rest = found
        new = _TRAMPOLINE.format(python=python).encode() + rest
        tmp = f"{entry.path}.envfs-tmp"
        with open(tmp, "wb") as f:
            f.write(new)
        os.chmod(tmp, 0o755)
        os.replace(tmp, entry.path)
        rewritten[entry.name] = new
    if rewritten:
        _update_records(site_packages, bin_dir, rewritten)
    return sorted(rewritten)


def _script_header(data: bytes, prefix: bytes) -> tuple[str, bytes] | None:
    """(interpreter name, the script after its header) if the header names ``prefix``.

    Installers write ``#!<prefix>/bin/python``, or, for a path too long for a shebang, a
    ``/bin/sh`` header that execs ``'<prefix>/bin/python'``.
    """
    lines = data.split(b"\n", 3)
    if lines[0].startswith(b"#!" + prefix + b"/"):
        return os.path.basename(lines[0][2:].split()[0].decode()), data.partition(b"\n")[2]
    quoted = b"'" * 3 + b"exec' '" + prefix + b"/"
    if len(lines) == 4 and lines[0] == b"#!/bin/sh" and lines[1].startswith(quoted):
        return os.path.basename(lines[1].split(b"'")[5].decode()), lines[3]
    return None


def _update_records(site_packages: Path, bin_dir: Path, rewritten: dict[str, bytes]) -> None:
    """Put the new hash and size of rewritten scripts into the RECORD files naming them."""
    for record in site_packages.glob("*.dist-info/RECORD"):
        rows = list(csv.reader(io.StringIO(record.read_text())))
        changed = False
        for row in rows:
            if len(row) < 3:
                continue
            path = os.path.normpath(site_packages / row[0])
            name = os.path.basename(path)
            if os.path.dirname(path) == str(bin_dir) and name in rewritten:
                data = rewritten[name]
                digest = hashlib.sha256(data).digest()
                row[1] = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                row[2] = str(len(data))
                changed = True
        if changed:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            tmp = record.with_name("RECORD.envfs-tmp")
            tmp.write_text(out.getvalue())
            os.replace(tmp, record)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dedup_into_objects(
    store: Store, root: Path, known: dict[tuple[int, int], str] | None = None
) -> int:
    """Hardlink files made by the build (not from uv's cache) into ``objects/``.

    Bytecode, RECORDs and entry-point scripts are identical across envs that share a
    package; the content-addressed pool makes them one inode like uv's cache does.
    The digests computed are added to ``known`` (by device and inode).
    Returns the number of files replaced by an existing object.
    """
    reused = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size == 0:
                continue
            mode = stat.S_IMODE(st.st_mode) & ~0o222
            digest = _sha256_file(path)
            reused += store.pool_file(path, digest, mode)
            if known is not None:
                st = os.lstat(path)
                known[(st.st_dev, st.st_ino)] = digest
    return reused


class DigestCache(Protocol):
    """Digests of files by inode, size and mtime (the node's index keeps them)."""

    def cached_digest(self, st: os.stat_result) -> str | None: ...

    def remember_digests(self, items: list[tuple[os.stat_result, str]]) -> None: ...


def scan_tree(
    root: Path,
    forbidden: list[bytes],
    known: dict[tuple[int, int], str] | None = None,
    cache: DigestCache | None = None,
) -> tuple[list[ManifestEntry], int]:
    """Every entry under ``root`` (but ``.envfs``), with sha256 of files; check no file
    contains a ``forbidden`` path (the staging dir): that would name the builder.

    ``known`` gives digests of files already hashed (by device and inode), such as those
    linked from a captured interpreter: they are neither read again nor searched.
    ``cache`` does the same across builds for files shared with uv's cache (hardlinks,
    unchanged since hashed): wheels' files, which cannot name a staging dir.
    """
    known = known or {}
    learned: list[tuple[os.stat_result, str]] = []
    entries: list[ManifestEntry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != META]
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode) & ~0o222
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                entries.append(ManifestEntry(path=rel, type="symlink", mode=0o777, target=target))
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append(ManifestEntry(path=rel, type="dir", mode=mode))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            digest = known.get((st.st_dev, st.st_ino))
            shared = st.st_nlink > 1 and cache is not None
            if digest is None and shared and cache is not None:
                digest = cache.cached_digest(st)
            if digest is None:
                with open(path, "rb") as f:
                    data = f.read()
                for needle in forbidden:
                    if needle in data:
                        raise BuildFailed(
                            f"{rel} contains the builder path {needle.decode()}: the snapshot "
                            "would not be relocatable (please report this package)"
                        )
                digest = hashlib.sha256(data).hexdigest()
                if shared:
                    learned.append((st, digest))
            entries.append(
                ManifestEntry(path=rel, type="file", mode=mode, size=st.st_size, sha256=digest)
            )
            total += st.st_size
    if learned and cache is not None:
        cache.remember_digests(learned)
    entries.sort(key=lambda e: e.path)
    return entries, total


def check_records(root: Path, entries: list[ManifestEntry]) -> None:
    """Every installed file must match its wheel's ``RECORD``: a damaged uv cache entry fails
    the build naming the file, instead of being hardlinked into the snapshot and blessed by
    its manifest.  (Digests come from the manifest scan: nothing is hashed twice.)"""
    digests = {e.path: e.sha256 for e in entries if e.type == "file"}
    for record in sorted(root.glob("lib/python*/site-packages/*.dist-info/RECORD")):
        site = record.parent.parent
        for path, want in record_digests(record):
            rel = os.path.normpath(os.path.relpath(site / path, root))
            got = digests.get(rel)
            if got is not None and got != want:
                dist = record.parent.name.split("-")[0]
                raise BuildFailed(
                    f"{rel} does not match its wheel's RECORD (the uv cache entry of {dist} "
                    f"is damaged): run `UV_CACHE_DIR=<store>/uv-cache uv cache clean {dist}` "
                    "and build again"
                )


def tree_digest(entries: list[ManifestEntry]) -> str:
    """sha256 over (path, type, mode, content digest or link target) of every entry."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.path, e.type, e.mode, e.sha256, e.target]).encode() + b"\n")
    return h.hexdigest()


def remove_staged(staged: Path) -> None:
    with contextlib.suppress(OSError):
        remove_tree(staged)
