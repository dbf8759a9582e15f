"""Side by side: from "this node needs env X" to its first import, and the disk of 20 envs.

Five real envs (requests; pandas+numpy; scikit-learn; fastapi+pydantic; sympy), Python 3.11,
each made four ways from warm caches, timed until `python -c "import M"` succeeds:

  envfs: `envfs bind bench/NODE PKGS --python 3.11` + `MNT/bench/NODE/bin/python -c "import M"`
         (the first access through the mount builds the env; uv's cache in the store is warm)
  uv:    `uv venv` + `uv pip install --link-mode=copy PKGS` (warm uv cache) + the import
  pip:   `python -m venv` + `pip install PKGS` (pip's cache warm) + the import
  ray:   a task with runtime_env={"pip": PKGS} on a local Ray cluster (ray.init(num_cpus=2,
         include_dashboard=False), a fresh cluster per trial, its start timed apart); from
         submitting the task, which imports M, to its result; pip's cache warm (Ray's default
         --no-cache-dir is overridden)
  conda/mamba: not measured when none is installed (none is installable from PyPI: see below)

Every trial adds a `six==V` pin no earlier trial had: the lock and the env are new while the
packages are in the caches (for Ray, a runtime_env it has not seen, so not one it cached). An
untimed warm-up first makes variant 0 of each env each way (it fills pip's caches). Trials are
interleaved (each round starts with another approach); medians; ratio = approach / envfs.

Disk: 5 envs x 4 variants = 20 envs each way; file sizes of distinct inodes over the directories
holding the envs (hardlinks counted once, as `du -sx`; for envfs the store's snapshots, which
also hold each env's interpreter) against the bound "one env plus distinct packages": the same
files with each (path in its env, size) counted once.

Targets: envfs first import <= 2 s and >= 5x faster than Ray; envfs disk <= 1.1x the bound.
Always exits 0 once it has measured; 2 on a setup error.
Usage: scripts/bench/compare [--trials N] [--slow-trials N] [--quick] [--keep DIR]
                             [--plots DIR] [--json FILE] [--replot FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _envfs import EnvfsHarness

from envfs.build import interpreters
from envfs.build.uv import uv_binary


@dataclass(frozen=True)
class EnvSet:
    name: str
    code: str
    pkgs: tuple[str, ...]


#: exact pins with CPython 3.11 manylinux x86_64 wheels (as scripts/bench/build)
SETS = (
    EnvSet("requests", "import requests", ("requests==2.32.3",)),
    EnvSet("pandas", "import pandas", ("pandas==2.2.3", "numpy==2.1.3")),
    EnvSet("sklearn", "import sklearn", ("scikit-learn==1.5.2",)),
    EnvSet("fastapi", "import fastapi, pydantic", ("fastapi==0.115.5", "pydantic==2.10.2")),
    EnvSet("sympy", "import sympy", ("sympy==1.13.3",)),
)
QUICK_SETS = ("requests", "sympy")
#: variant v of an env adds six==SIX[v]; variant 0 is the untimed warm-up
SIX = ("1.16.0", "1.15.0", "1.14.0", "1.13.0", "1.12.0", "1.11.0", "1.10.0")
DISK_VARIANTS = 4
PYTHON = "3.11"
APPROACHES = ("envfs", "uv", "pip", "ray")
LABELS = {
    "envfs": "envfs (bind + first access)",
    "uv": "uv venv + uv pip install --link-mode=copy",
    "pip": "python -m venv + pip install",
    "ray": 'Ray runtime_env={"pip": ...}',
}
SHORT = {"envfs": "envfs", "uv": "uv (copy)", "pip": "venv + pip", "ray": "Ray runtime_env"}
FIRST_TARGET_S = 2.0
RAY_FACTOR_TARGET = 5.0
DISK_TARGET = 1.1
RAY_TIMEOUT_S = 900
PROJECT_PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
CONDA_NAMES = ("micromamba", "mamba", "conda")
CONDA_FINDING = (
    "none is installable from PyPI in a usable way: micromamba is not on PyPI, every `conda` "
    "release there is yanked (the last, 4.3.16, dates from 2017 and is no installer), `mamba` "
    "there is an unrelated test runner, and py-rattler (a library that installs conda "
    "packages) needs a conda channel, which this machine cannot reach (its network reaches the "
    "PyPI, Debian and npm registries only)"
)


class SetupError(Exception):
    """Something the benchmark needs is missing or failed before anything was timed."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str], cwd: Path | str = "/", timeout: float = 1800) -> str:
    done = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-600:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: {tail}")
    return done.stdout


def rmtree(path: Path) -> None:
    """Remove a tree, also where the store made directories read-only."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    for where, dirs, _files in os.walk(path):
        for d in [where, *(os.path.join(where, d) for d in dirs)]:
            with contextlib.suppress(OSError):
                if not os.path.islink(d):
                    os.chmod(d, os.lstat(d).st_mode | 0o700)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Trial:
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    env_dir: str = ""


@dataclass
class Disk:
    envs: int  # how many envs were measured
    real: int  # file sizes of distinct inodes (bytes)
    blocks: int  # their blocks
    bound: int  # one env plus distinct packages: (path in env, size) counted once
    extra: dict[str, int] = field(default_factory=dict)  # caches etc. beside the envs


@dataclass
class Results:
    sets: list[str]
    trials: dict[str, int]
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    parts: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    warmup: dict[str, dict[str, float]] = field(default_factory=dict)
    ray_init: list[float] = field(default_factory=list)
    disk: dict[str, Disk] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    conda: str = ""
    elapsed: float = 0.0
    date: str = ""

    @staticmethod
    def load(path: Path) -> Results:
        raw = json.loads(path.read_text())
        raw["disk"] = {k: Disk(**v) for k, v in raw.get("disk", {}).items()}
        return Results(**raw)


def disk_usage(dirs: list[Path]) -> tuple[int, int, int]:
    """(file sizes of distinct inodes, their blocks, the bound) over the env dirs ``dirs``.

    The bound counts each (path relative to its env dir, size) once: one env plus what the
    other envs add (their distinct packages and versions), as an ideal store of whole files.
    """
    inodes: set[tuple[int, int]] = set()
    keys: set[tuple[str, int]] = set()
    real = blocks = bound = 0
    for top in dirs:
        for where, _dirs, files in os.walk(top):
            rel = os.path.relpath(where, top)
            for name in files:
                st = os.lstat(os.path.join(where, name))
                if (st.st_mode & 0o170000) != 0o100000:  # regular files only
                    continue
                if (st.st_dev, st.st_ino) not in inodes:
                    inodes.add((st.st_dev, st.st_ino))
                    real += st.st_size
                    blocks += st.st_blocks * 512
                key = (os.path.join(rel, name), st.st_size)
                if key not in keys:
                    keys.add(key)
                    bound += st.st_size
    return real, blocks, bound


def tree_bytes(path: Path) -> int:
    """File sizes of distinct inodes under ``path`` (0 if it is missing)."""
    return disk_usage([path])[0] if path.exists() else 0


# -- the approaches ---------------------------------------------------------------------------


class Approach:
    key = ""

    def __init__(self, root: Path, base_python: str, run_env: dict[str, str]) -> None:
        self.root = root / self.key
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_python = base_python
        self.run_env = run_env
        self.envs: dict[tuple[str, int], Path] = {}  # (set, variant) -> env dir
        self.notes: list[str] = []

    def prepare(self, sets: list[EnvSet], variants: int) -> dict[str, float]:
        """Untimed: variant 0 of every set (seconds each), the caches warm for ``variants``."""
        out = {}
        for s in sets:
            t0 = time.perf_counter()
            self.make(s, 0)
            out[s.name] = time.perf_counter() - t0
            say(f"{self.key}: warm-up {s.name} in {out[s.name]:.1f} s")
        return out

    def make(self, s: EnvSet, variant: int) -> Trial:
        raise NotImplementedError

    def pkgs(self, s: EnvSet, variant: int) -> list[str]:
        return [*s.pkgs, f"six=={SIX[variant]}"]

    def import_in(self, python: Path, s: EnvSet, env: dict[str, str]) -> None:
        run([str(python), "-c", s.code], env)

    def env_dirs(self, variants: int) -> list[Path]:
        return [d for (_s, v), d in sorted(self.envs.items()) if v < variants]

    def extra(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class Envfs(Approach):
    key = "envfs"

    def __init__(self, root: Path, base_python: str, run_env: dict[str, str]) -> None:
        super().__init__(root, base_python, run_env)
        self.h = EnvfsHarness(self.root, PYTHON)
        self.h.run_env = run_env
        self.cache = self.root / "store" / "uv-cache"

    def prepare(self, sets: list[EnvSet], variants: int) -> dict[str, float]:
        out = {}
        for s in sets:  # `envfs build`: eager, untimed (the first one captures the interpreter)
            t0 = time.perf_counter()
            self.h.cli("build", f"bench/{s.name}0", *self.pkgs(s, 0), "--python", PYTHON)
            out[s.name] = time.perf_counter() - t0
            self.envs[(s.name, 0)] = self.snapshot(f"bench/{s.name}0")
            say(f"envfs: warm-up build of {s.name} in {out[s.name]:.1f} s")
        # every six the trials add, into the store's uv cache (so only the lock is new)
        env = dict(self.run_env, UV_CACHE_DIR=str(self.cache), UV_PYTHON_DOWNLOADS="never")
        for v in range(1, variants):
            target = self.root / f"six-{v}"
            run([uv_binary(), "pip", "install", "-q", "--python", self.base_python,
                 "--target", str(target), f"six=={SIX[v]}"], env)  # fmt: skip
            rmtree(target)
        self.h.mount()
        return out

    def snapshot(self, binding: str) -> Path:
        return Path(json.loads(self.h.cli("show", binding, "--json"))["snapshot_path"])

    def make(self, s: EnvSet, variant: int) -> Trial:
        node = f"{s.name}{variant}"
        t0 = time.perf_counter()
        self.h.cli("bind", f"bench/{node}", *self.pkgs(s, variant), "--python", PYTHON)
        t1 = time.perf_counter()
        self.import_in(self.h.mnt / "bench" / node / "bin" / "python", s, self.run_env)
        t2 = time.perf_counter()
        # the same import once more: what the import itself costs once the env is there
        self.import_in(self.h.mnt / "bench" / node / "bin" / "python", s, self.run_env)
        t3 = time.perf_counter()
        snap = self.snapshot(f"bench/{node}")
        self.envs[(s.name, variant)] = snap
        parts = {"bind (lock)": t1 - t0, "first access (build) + import": t2 - t1}
        with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
            manifest = json.loads((snap / ".envfs" / "manifest.json").read_text())
            for phase, seconds in manifest["durations"].items():
                parts[f"build: {phase}"] = float(seconds)
        parts["import again (not counted)"] = t3 - t2
        return Trial(t2 - t0, parts, str(snap))

    def extra(self) -> dict[str, int]:
        du = json.loads(self.h.cli("du", "--json"))
        store = self.root / "store"
        interp = store / "interpreters"
        return {
            "envfs du real_bytes": du["real_bytes"],
            "envfs du snapshots": du["snapshots"],
            "uv cache not linked by an env": du["uv_cache_extra_bytes"],
            "captured interpreter (inside the envs)": tree_bytes(interp),
            "whole store": tree_bytes(store),
        }

    def close(self) -> None:
        self.h.umount()


class Uv(Approach):
    key = "uv"

    def __init__(self, root: Path, base_python: str, run_env: dict[str, str], cache: Path) -> None:
        super().__init__(root, base_python, run_env)
        self.cache = cache
        self.env = dict(run_env, UV_CACHE_DIR=str(cache), UV_PYTHON_DOWNLOADS="never")

    def make(self, s: EnvSet, variant: int) -> Trial:
        where = self.root / f"{s.name}-{variant}"
        uv = uv_binary()
        t0 = time.perf_counter()
        run([uv, "venv", "-q", "--python", self.base_python, str(where)], self.env)
        t1 = time.perf_counter()
        run([uv, "pip", "install", "-q", "--link-mode=copy", "--python",
             str(where / "bin" / "python"), *self.pkgs(s, variant)], self.env)  # fmt: skip
        t2 = time.perf_counter()
        self.import_in(where / "bin" / "python", s, self.env)
        t3 = time.perf_counter()
        self.envs[(s.name, variant)] = where
        return Trial(t3 - t0, {"venv": t1 - t0, "install": t2 - t1, "import": t3 - t2}, str(where))


def pip_env(run_env: dict[str, str], cache: Path) -> dict[str, str]:
    """pip with its own cache and none of this machine's pip configuration (extra file
    indexes, find-links, a constraints file): pip as it comes."""
    env = {k: v for k, v in run_env.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_CACHE_DIR=str(cache))
    return env


class Pip(Approach):
    key = "pip"

    def __init__(self, root: Path, base_python: str, run_env: dict[str, str], cache: Path) -> None:
        super().__init__(root, base_python, run_env)
        self.cache = cache
        self.env = pip_env(run_env, cache)

    def prepare(self, sets: list[EnvSet], variants: int) -> dict[str, float]:
        out = super().prepare(sets, variants)
        pip = self.envs[(sets[0].name, 0)] / "bin" / "pip"  # the pip `python -m venv` gives
        for v in range(1, variants):
            run([str(pip), "download", "-q", "--no-deps", "-d", str(self.root / "six"),
                 f"six=={SIX[v]}"], self.env)  # fmt: skip
        rmtree(self.root / "six")
        if tree_bytes(self.cache) < 2**20:
            self.notes.append(
                "pip's cache stayed empty after the warm-up, so pip (and Ray's pip) downloaded "
                "the wheels again in every trial: pip's HTTP cache stores nothing when PyPI's "
                "responses reach it without Cache-Control headers, as on the machine this was "
                "written on"
            )
        return out

    def make(self, s: EnvSet, variant: int) -> Trial:
        where = self.root / f"{s.name}-{variant}"
        t0 = time.perf_counter()
        run([self.base_python, "-m", "venv", str(where)], self.env)
        t1 = time.perf_counter()
        run([str(where / "bin" / "pip"), "install", "-q", *self.pkgs(s, variant)], self.env)
        t2 = time.perf_counter()
        self.import_in(where / "bin" / "python", s, self.env)
        t3 = time.perf_counter()
        self.envs[(s.name, variant)] = where
        return Trial(t3 - t0, {"venv": t1 - t0, "install": t2 - t1, "import": t3 - t2}, str(where))

    def extra(self) -> dict[str, int]:
        return {"pip cache": tree_bytes(self.cache)}


class Ray(Approach):
    """Each trial: a driver process (the project's Python) starts a local cluster, submits one
    task with the runtime_env, waits for its result and shuts the cluster down."""

    key = "ray"

    def __init__(self, root: Path, base_python: str, run_env: dict[str, str], cache: Path) -> None:
        super().__init__(root, base_python, run_env)
        self.cache = cache
        # Ray's session paths hold unix sockets (<= 107 bytes): a short dir of our own
        self.tmp = Path(tempfile.mkdtemp(prefix="ecmp-ray."))
        (self.root / "ray-tmp").symlink_to(self.tmp)
        self.env = pip_env(run_env, cache)
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.init_times: list[float] = []
        self.runs = 0

    def drive(self, jobs: list[tuple[EnvSet, int]]) -> tuple[float, list[dict[str, Any]]]:
        """Run the jobs in one fresh cluster: (its start seconds, each job's result)."""
        self.runs += 1
        spec = self.root / f"driver-{self.runs}.json"
        result = self.root / f"driver-{self.runs}.out.json"
        spec.write_text(
            json.dumps(
                {
                    "temp_dir": str(self.tmp),
                    "result": str(result),
                    "jobs": [{"code": s.code, "pkgs": self.pkgs(s, v)} for s, v in jobs],
                }
            )
        )
        cwd = self.root / "cwd"
        cwd.mkdir(exist_ok=True)
        log = self.root / f"driver-{self.runs}.log"
        cmd = [str(PROJECT_PYTHON), str(Path(__file__).resolve()), "--ray-driver", str(spec)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, cwd=cwd, stdout=out, stderr=out)
            try:
                proc.wait(timeout=RAY_TIMEOUT_S * len(jobs) + 120)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # the driver shuts its cluster down
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.reap()
        if not result.exists():
            raise RuntimeError(f"ray driver exited {proc.returncode}; see {log}")
        data: dict[str, Any] = json.loads(result.read_text())
        if data.get("error"):
            raise RuntimeError(f"ray: {data['error'][-600:]}; see {log}")
        return float(data["init"]), list(data["jobs"])

    def reap(self) -> None:
        """Stop any process of our cluster that outlived its driver (its argv names our dir)."""
        mark = str(self.tmp).encode()
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            with contextlib.suppress(OSError):
                if mark in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
                    say(f"ray: killed left-over process {pid}")

    def prepare(self, sets: list[EnvSet], variants: int) -> dict[str, float]:
        venv = PROJECT_PYTHON.parents[1]
        self.notes.append(
            f"Ray clones the driver's venv ({venv}, {tree_bytes(venv) / 2**20:.0f} MiB with its "
            "bytecode, which the clone leaves out) into every runtime_env, and pip installs there "
            "only what that venv lacks or has in another version"
        )
        init, jobs = self.drive([(s, 0) for s in sets])  # one cluster for the warm-up
        out = {}
        for s, job in zip(sets, jobs, strict=True):
            self.envs[(s.name, 0)] = Path(job["env_dir"])
            out[s.name] = job["seconds"]
            say(f"ray: warm-up {s.name} in {job['seconds']:.1f} s")
        say(f"ray: warm-up cluster started in {init:.1f} s")
        # every six the trials add, into pip's cache (Ray's pip is the driver venv's)
        for v in range(1, variants):
            run([str(PROJECT_PYTHON), "-m", "pip", "download", "-q", "--no-deps", "-d",
                 str(self.root / "six"), f"six=={SIX[v]}"], self.env)  # fmt: skip
        rmtree(self.root / "six")
        return out

    def make(self, s: EnvSet, variant: int) -> Trial:
        init, (job,) = self.drive([(s, variant)])
        self.init_times.append(init)
        self.envs[(s.name, variant)] = Path(job["env_dir"])
        parts = {"cluster start (not counted)": init, **ray_phases(Path(job["session"]))}
        parts["rest: worker start, import"] = job["seconds"] - sum(
            v for k, v in parts.items() if k.startswith(("venv clone", "pip install"))
        )
        return Trial(job["seconds"], parts, job["env_dir"])

    def extra(self) -> dict[str, int]:
        return {"pip cache": tree_bytes(self.cache)}

    def close(self) -> None:
        self.reap()


def ray_phases(session: Path) -> dict[str, float]:
    """From the runtime_env setup log: cloning the driver's venv (and Ray's version check),
    and pip install (and the check after it)."""
    stamps: dict[str, datetime.datetime] = {}
    marks = {
        "Cloning virtualenv": "clone",
        "Creating virtualenv": "clone",
        "Installing python requirements": "install",
        "Added URI pip://": "done",
    }
    for log in sorted((session / "logs").glob("runtime_env_setup-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            for mark, name in marks.items():
                if mark in line and name not in stamps:
                    with contextlib.suppress(ValueError):
                        stamps[name] = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    if not {"clone", "install", "done"} <= stamps.keys():
        return {}
    return {
        "venv clone + ray check": (stamps["install"] - stamps["clone"]).total_seconds(),
        "pip install + ray check": (stamps["done"] - stamps["install"]).total_seconds(),
    }


def ray_driver(spec_path: Path) -> None:
    """The driver process: run by the project's Python, so Ray's workers run it too."""
    spec = json.loads(spec_path.read_text())
    out: dict[str, Any] = {"jobs": []}
    import ray

    @ray.remote
    def probe(code: str) -> str:
        exec(code)
        return sys.prefix

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=spec["temp_dir"])
        out["init"] = time.perf_counter() - t0
        session = str(Path(spec["temp_dir"], "session_latest").resolve())
        for job in spec["jobs"]:
            runtime_env = {
                "pip": {
                    "packages": job["pkgs"],
                    # Ray's default adds --no-cache-dir: every env would download its packages
                    "pip_install_options": ["--disable-pip-version-check"],
                }
            }
            t1 = time.perf_counter()
            ref = probe.options(runtime_env=runtime_env).remote(job["code"])
            prefix = ray.get(ref, timeout=RAY_TIMEOUT_S)
            seconds = time.perf_counter() - t1
            # PREFIX = .../runtime_resources/pip/<hash>/virtualenv
            out["jobs"].append(
                {"seconds": seconds, "env_dir": str(Path(prefix).parent), "session": session}
            )
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        ray.shutdown()
        Path(spec["result"]).write_text(json.dumps(out))


# -- running ----------------------------------------------------------------------------------


def conda_check() -> str:
    found = [n for n in CONDA_NAMES if shutil.which(n)]
    if found:
        return (
            f"(e) conda/mamba: {', '.join(found)} found on PATH, but this benchmark has no "
            "conda path: not measured"
        )
    return f"(e) conda/mamba: not measured. None is installed here, and {CONDA_FINDING}."


def check_setup() -> str:
    """The base interpreter's path; SetupError if something needed is missing."""
    for tool in ("fusermount3",):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is missing (scripts/setup installs it)")
    try:
        uv_binary()
        base = str(interpreters.find(PYTHON).path)
    except Exception as e:
        raise SetupError(str(e)) from e
    if not PROJECT_PYTHON.exists():
        raise SetupError(f"{PROJECT_PYTHON} is missing (scripts/setup makes it)")
    for module in ("ray", "virtualenv", "pip"):
        if importlib.util.find_spec(module) is None:
            raise SetupError(f"{module} is not in the project venv (uv sync installs it)")
    return base


def measure(args: argparse.Namespace, root: Path, sets: list[EnvSet]) -> Results:
    base = check_setup()
    trials = {a: args.trials for a in APPROACHES}
    for slow in ("pip", "ray"):
        trials[slow] = args.slow_trials
    variants = 1 + max(trials.values())
    disk_variants = 1 + args.trials if args.quick else DISK_VARIANTS
    res = Results(sets=[s.name for s in sets], trials=trials, date=time.strftime("%Y-%m-%d"))
    res.conda = conda_check()
    say(res.conda)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run_env.pop("VIRTUAL_ENV", None)
    envfs = Envfs(root, base, run_env)
    ray = Ray(root, base, run_env, root / "pip-cache")
    approaches: dict[str, Approach] = {
        "envfs": envfs,
        "uv": Uv(root, base, run_env, envfs.node.cache),
        "pip": Pip(root, base, run_env, root / "pip-cache"),
        "ray": ray,
    }
    try:
        try:
            for key, a in approaches.items():
                say(f"{key}: warm-up (variant 0 of each env, untimed)")
                res.warmup[key] = a.prepare(sets, max(variants, disk_variants))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise SetupError(f"warm-up: {e}") from e
        for key in APPROACHES:
            res.times[key] = {s.name: [] for s in sets}
            res.parts[key] = {s.name: [] for s in sets}
            res.failures[key] = {}
        for s in sets:
            for k in range(1, variants):
                order = APPROACHES[(k - 1) % 4 :] + APPROACHES[: (k - 1) % 4]
                line = []
                for key in order:
                    if k > trials[key] or s.name in res.failures[key]:
                        continue
                    # write back what the trial before left dirty (Ray writes ~0.5 GB an
                    # env): a build's sync must not pay for another approach's writes
                    os.sync()
                    try:
                        t = approaches[key].make(s, k)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        res.failures[key][s.name] = str(e)[-300:]
                        say(f"{key} {s.name} trial {k} FAILED: {e}")
                        continue
                    res.times[key][s.name].append(t.seconds)
                    res.parts[key][s.name].append(t.parts)
                    line.append(f"{key} {t.seconds:.2f} s")
                say(f"{s.name} trial {k}: " + ", ".join(line))
        res.ray_init = list(ray.init_times)
        say(f"disk: filling up to {disk_variants} variants of each env (untimed), then du")
        for key, a in approaches.items():
            for s in sets:
                for v in range(disk_variants):
                    if (s.name, v) not in a.envs and s.name not in res.failures[key]:
                        try:
                            a.make(s, v)
                        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                            res.notes.append(f"{key}: variant {v} of {s.name} failed: {e}")
            dirs = a.env_dirs(disk_variants)
            real, blocks, bound = disk_usage(dirs)
            res.disk[key] = Disk(len(dirs), real, blocks, bound, a.extra())
            res.notes.extend(a.notes)
            say(f"{key}: {len(dirs)} envs, {real / 2**20:.0f} MiB (bound {bound / 2**20:.0f})")
        res.disk["base interpreter"] = Disk(1, *disk_usage([Path(base).parents[1]]))
    finally:
        for a in approaches.values():
            try:
                a.close()
            except Exception as e:
                say(f"{a.key}: cleanup: {e}")
    return res


# -- reporting --------------------------------------------------------------------------------


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def envfs_rest(parts: dict[str, float]) -> dict[str, float]:
    """With envfs's parts, what its first access spent beside the build and the import."""
    builds = [v for k, v in parts.items() if k.startswith("build: ")]
    first, again = (
        parts.get("first access (build) + import"),
        parts.get("import again (not counted)"),
    )
    if not builds or first is None or again is None:
        return parts
    return {**parts, "rest of the first access": first - sum(builds) - again}


def report(res: Results) -> list[str]:
    out: list[str] = []
    n = ", ".join(f"{SHORT[a]} {res.trials[a]}" for a in APPROACHES)
    out.append(f"compare ({res.date}, Python {PYTHON}; {res.elapsed / 60:.1f} min in all)")
    out.append(f"time to the first import of a new env, warm caches; medians of trials ({n})")
    out.append("ratio = approach / envfs")
    head = f"{'env':9s}" + "".join(f"{SHORT[a]:>22s}" for a in APPROACHES)
    out.append(head)
    for s in res.sets:
        ours = med(res.times["envfs"][s])
        cells = []
        for a in APPROACHES:
            m = med(res.times[a][s])
            if m is None:
                cells.append(f"{'failed' if s in res.failures[a] else '-':>22s}")
            elif a == "envfs" or ours is None:
                cells.append(f"{m:>20.2f} s")
            else:
                cells.append(f"{m:>11.2f} s {m / ours:>7.1f}x")
        out.append(f"{s:9s}" + "".join(cells))
    if res.ray_init:
        out.append(
            f"Ray cluster start (ray.init, not counted above): median {med(res.ray_init):.1f} s "
            f"of {len(res.ray_init)}"
        )
    out.append("medians of the phases (seconds):")
    for a in APPROACHES:
        for s in res.sets:
            parts = [envfs_rest(p) for p in res.parts[a][s]]
            if parts:
                keys = list(dict.fromkeys(k for p in parts for k in p))
                txt = ", ".join(
                    f"{k} {statistics.median(p.get(k, 0.0) for p in parts):.2f}" for k in keys
                )
                out.append(f"  {a} {s}: {txt}")
    for a, failed in res.failures.items():
        for s, why in failed.items():
            out.append(f"  FAILED {a} {s}: {why}")
    out.append("")
    out.append("disk, MiB (file sizes of distinct inodes over the env dirs; bound = one env plus")
    out.append("distinct packages: each (path in env, size) once; ratio = MiB / bound)")
    out.append(
        f"{'approach':18s}{'envs':>6s}{'MiB':>10s}{'bound':>10s}{'ratio':>8s}  beside the envs"
    )
    for a in APPROACHES:
        d = res.disk.get(a)
        if d is None:
            continue
        extra = "; ".join(
            f"{k} {v / 2**20:.0f} MiB" if k != "envfs du snapshots" else f"{k} {v}"
            for k, v in d.extra.items()
        )
        out.append(
            f"{SHORT[a]:18s}{d.envs:6d}{d.real / 2**20:10.0f}{d.bound / 2**20:10.0f}"
            f"{d.real / d.bound:8.2f}  {extra}"
        )
    base = res.disk.get("base interpreter")
    if base is not None:
        out.append(
            f"the venvs (uv, pip, Ray) also need the base interpreter they link to: pyenv's "
            f"{PYTHON} install, {base.real / 2**20:.0f} MiB here (not in their MiB)"
        )
    out.append("")
    out.append(res.conda)
    out.extend(res.notes)
    out.append("")
    out.extend(targets(res))
    return out


def targets(res: Results) -> list[str]:
    out = []
    firsts = {s: med(res.times["envfs"][s]) for s in res.sets}
    slow = {s: t for s, t in firsts.items() if t is None or t > FIRST_TARGET_S}
    worst = max((t for t in firsts.values() if t is not None), default=float("nan"))
    out.append(
        f"target: envfs first import from a warm cache <= {FIRST_TARGET_S:.0f} s: "
        + ("met" if not slow else f"MISSED ({', '.join(slow)})")
        + f" (slowest {worst:.2f} s)"
    )
    factors = {}
    for s, t in firsts.items():
        r = med(res.times["ray"][s])
        factors[s] = None if (t is None or r is None) else r / t
    low = [s for s, f in factors.items() if f is None or f < RAY_FACTOR_TARGET]
    least = min((f for f in factors.values() if f is not None), default=float("nan"))
    out.append(
        f"target: envfs >= {RAY_FACTOR_TARGET:.0f}x faster than Ray runtime_env: "
        + ("met" if not low else f"MISSED ({', '.join(low)})")
        + f" (least {least:.1f}x)"
    )
    d = res.disk.get("envfs")
    if d is not None:
        r = d.real / d.bound
        out.append(
            f"target: envfs disk for {d.envs} envs <= {DISK_TARGET}x one env plus distinct "
            f"packages: {'met' if r <= DISK_TARGET else 'MISSED'} ({r:.2f}x)"
        )
    return out


def plot(res: Results, where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    colors = {"envfs": "#2a7ab0", "uv": "#6aa84f", "pip": "#e69138", "ray": "#a64d79"}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.2
    for i, a in enumerate(APPROACHES):
        xs, ys, lo, hi = [], [], [], []
        for j, s in enumerate(res.sets):
            t = res.times[a][s]
            if not t:
                continue
            m = statistics.median(t)
            xs.append(j + (i - 1.5) * width)
            ys.append(m)
            lo.append(m - min(t))
            hi.append(max(t) - m)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[a], label=SHORT[a])
        done = [s for s in res.sets if res.times[a][s]]
        for x, y, top, s in zip(xs, ys, hi, done, strict=True):
            ours = med(res.times["envfs"][s])
            ratio = None if a == "envfs" or ours is None else y / ours
            text = f"{y:.1f}s" if ratio is None else f"{ratio:.{1 if ratio < 10 else 0}f}x"
            ax.text(x, (y + top) * 1.05, text, ha="center", va="bottom", fontsize=7)
    ax.axhline(FIRST_TARGET_S, color=colors["envfs"], ls="--", lw=0.8)
    ax.text(-0.45, FIRST_TARGET_S * 1.04, "envfs target 2 s", ha="left", va="bottom",
            fontsize=7, color=colors["envfs"])  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(len(res.sets)), res.sets)
    ax.set_ylabel("seconds to first import (log)")
    ax.set_title(
        f"New env from warm caches to first import, Python {PYTHON} "
        "(median, min-max; label: x envfs)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4)
    fig.tight_layout()
    fig.savefig(where / "compare-time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    keys = [a for a in APPROACHES if a in res.disk]
    real = [res.disk[a].real / 2**20 for a in keys]
    bound = [res.disk[a].bound / 2**20 for a in keys]
    rows = list(range(len(keys)))
    ax.barh(rows, real, 0.6, color=[colors[a] for a in keys], label="measured")
    ax.scatter(bound, rows, marker="|", s=400, color="black", zorder=3, label="bound")
    for y, r, b in zip(rows, real, bound, strict=True):
        ax.text(
            max(r, b) + max(real) * 0.015, y, f"{r:,.0f} MiB ({r / b:.2f}x bound)", va="center",
            fontsize=8,
        )  # fmt: skip
    n = res.disk[keys[0]].envs if keys else 0
    ax.set_yticks(rows, [SHORT[a] for a in keys])
    ax.invert_yaxis()
    ax.set_xlim(0, max(real, default=1) * 1.45)
    ax.set_xlabel("MiB, hardlinked files counted once")
    ax.set_title(f"Disk for {n} envs (bound: one env plus distinct packages)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    base = res.disk.get("base interpreter")
    if base is not None and "envfs" in res.disk:
        inside = res.disk["envfs"].extra.get("captured interpreter (inside the envs)", 0)
        fig.text(
            0.01,
            0.01,
            f"envfs envs include their interpreter ({inside / 2**20:.0f} MiB, once); the venvs "
            f"link to pyenv's {PYTHON} ({base.real / 2**20:.0f} MiB), not counted here",
            fontsize=7,
        )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(where / "compare-disk.png", dpi=110)
    plt.close(fig)


def main() -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\nUsage:")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=3, help="timed trials per approach and env")
    parser.add_argument(
        "--slow-trials", type=int, help="trials for pip and Ray (default: --trials)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 trial, 2 envs")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (stores, envs, logs)")
    parser.add_argument("--plots", type=Path, help="write compare-time.png, compare-disk.png here")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--replot", type=Path, help="report and plot a --json file; no run")
    parser.add_argument("--ray-driver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_driver:
        ray_driver(args.ray_driver)
        return
    if args.replot:
        res = Results.load(args.replot)
        print("\n".join(report(res)))
        if args.plots:
            plot(res, args.plots)
        return
    if args.quick:
        args.trials, args.slow_trials = 1, 1
    args.trials = max(1, min(args.trials, len(SIX) - 1))
    args.slow_trials = max(1, min(args.slow_trials or args.trials, args.trials))
    sets = [s for s in SETS if not args.quick or s.name in QUICK_SETS]
    root = args.keep or Path(tempfile.mkdtemp(prefix="envfs-bench-compare."))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        res = measure(args, root, sets)
    except SetupError as e:
        print(f"setup error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if args.keep is None:
            for link in root.glob("*/ray-tmp"):
                rmtree(link.resolve())
            if os.path.ismount(root / "envfs" / "mnt"):
                say(f"{root / 'envfs' / 'mnt'} is still mounted: {root} left in place")
            else:
                rmtree(root)
    res.elapsed = time.monotonic() - t0
    print("\n" + "\n".join(report(res)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(res), indent=1))
    if args.plots:
        plot(res, args.plots)


if __name__ == "__main__":
    main()
