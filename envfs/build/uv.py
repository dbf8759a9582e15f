"""Running uv: the binary and its environment, its errors as one line with uv's hint, the
build log, and the locking steps (lock a requirement list, check a project's lock, build a
project's wheel)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from envfs.build.sources import INDEX_VARS
from envfs.build.spec import Indexes, ProjectFiles, render_pyproject
from envfs.core import crashpoints
from envfs.core.errors import BadInput, BuildFailed, EnvironmentProblem
from envfs.store.formats import Interpreter
from envfs.store.layout import Store

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
        if indexes.no_build:
            env["UV_NO_BUILD"] = "1"
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
        env = dict(uv_env(store, indexes), UV_NO_BUILD="1")  # build code: only in the sandbox
        _crash_while_running("lock", cmd, env)
        proc = None
        if offline_first:
            offline = tool_command([*cmd, "--offline"])
            proc = subprocess.run(offline, capture_output=True, text=True, env=env, check=False)
        if proc is None or proc.returncode != 0:
            proc = subprocess.run(
                tool_command(cmd), capture_output=True, text=True, env=env, check=False
            )
        if proc.returncode != 0 and needs_source_build(proc.stderr) and not indexes.no_build:
            proc = _lock_in_sandbox(Path(tmp), python_path(store, interp), env)
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
            if indexes.no_build:
                _refuse_source_builds(proc.stderr)
            raise BadInput(f"cannot resolve the requirements: {reason}")
        return ProjectFiles(pyproject=pyproject, lock=(Path(tmp) / "uv.lock").read_text())


def needs_source_build(stderr: str) -> bool:
    """Whether uv failed only because ``--no-build`` kept it from building an sdist."""
    return "no-build" in stderr or "building is disabled" in stderr.lower()


def source_builds(stderr: str) -> list[str]:
    """The packages a ``--no-build`` failure of uv names."""
    return sorted({m[1] for m in _NO_BUILD.finditer(stderr)} - {"uv", "envfs-env"})


def _lock_in_sandbox(
    project: Path, python: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``uv lock`` of ``project`` in the sandbox (`envfs.build.sandbox`), which may run
    build backends for metadata; its ``uv.lock`` copied back on success."""
    from envfs.build import sandbox

    with sandbox.sandbox(python, uv_binary()) as box:
        work = box.scratch / "work" / "project"
        shutil.copytree(project, work)
        box.give(work)
        proc = box.run(["lock", "--project", str(work), "--python", box.python], env)
        if proc.returncode == 0:
            shutil.copyfile(work / "uv.lock", project / "uv.lock")
        return proc


_NO_BUILD = re.compile(r"`([A-Za-z0-9][A-Za-z0-9._-]*)(?:==[^`]*)?`[^\n]*(?:no-build|build)")


def _refuse_source_builds(stderr: str) -> None:
    """The one-line refusal of ``--build-policy wheels-only`` when uv needed to build a
    source distribution (the packages named), else nothing."""
    if not needs_source_build(stderr):
        return
    names = source_builds(stderr)
    raise BadInput(
        f"--build-policy wheels-only: {', '.join(names) or 'a package'} has no wheel for this "
        "Python and would need a source build (its build code would run); pick a version "
        "with wheels or another build policy"
    )


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
    the env gets the project itself, not editable, so it never reads the project's tree).
    Its build backend is package code: it runs in the build sandbox (`envfs.build.sandbox`)
    on a copy of the project (``.git``, ``.venv`` and caches left out)."""
    from envfs.build import sandbox

    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache")
    with sandbox.sandbox(python_path(store, interp), uv_binary()) as box:
        work = box.scratch / "work" / "project"
        shutil.copytree(project, work, symlinks=True, ignore=skip)
        box.give(work)
        built = box.scratch / "out"
        proc = box.run(
            ["build", "--wheel", "--out-dir", str(built), "--python", box.python, str(work)],
            uv_env(store),
        )
        wheels = sorted(built.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            if _uv_network_failure(proc.stderr):
                why = _uv_error(proc.stderr)
                raise EnvironmentProblem(f"cannot reach the package index: {why}")
            raise BadInput(f"cannot build {project} into a wheel: {_uv_error(proc.stderr)}")
        dest = out / wheels[0].name
        shutil.copyfile(wheels[0], dest)
    return dest


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
    """Run uv; its output goes to the build log and, line by line, to the progress.
    `BuildFailed` (or `EnvironmentProblem`: a full store) if it fails."""
    return _succeeded(*_attempt(cmd, env, log, phase), what)


def _succeeded(code: int, output: str, what: str) -> str:
    """``output`` of a uv run that exited ``code``, or the error it means."""
    if code != 0:
        if _UV_DISK_FULL in output:
            raise EnvironmentProblem(f"the store is full: {what} failed: {_uv_error(output)}")
        raise BuildFailed(f"{what} failed: {_uv_error(output)}")
    return output


def _attempt(
    cmd: list[str], env: dict[str, str], log: BuildLog, phase: str = ""
) -> tuple[int, str]:
    """Run uv as `_run` does; its exit code and output, whatever they are."""
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
    return proc.wait(), output
