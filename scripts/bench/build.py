"""Bind -> first import through the mount of a new env, vs uv alone (the floor).

For each of 5 real envs (requests; pandas; scikit-learn; fastapi+pydantic; sympy), a new spec
from a warm cache: the env's packages plus a `six` version no env of it had (so the lock and
the build are new, while the packages are in the uv cache and the bytecode pool knows their
modules, as when a workflow changes one pin).  Timed, interleaved, TRIALS times each:

  ours:  `envfs bind WF/NODE PKGS six==V` + `MNT/WF/NODE/bin/python -c "import M"`
         (the first access builds the env in the daemon)
  floor: `uv venv` + `uv pip install --link-mode hardlink PKGS six==V` from the same warm uv
         cache + `python -c "import M"` (which compiles only what it imports)

Prints the ratio per env (target <= 1.5x) and the per-phase breakdown of our builds (from the
snapshot manifests). With --cold, one more row: pandas with an empty store and uv cache on
both sides (downloads included).

With --sandbox, what running build code unprivileged costs (`envfs build`, new specs from a
warm cache, up to 3 trials each, interleaved): an env of wheels (requests, with a certifi
pin of its own per policy and trial, so neither side reuses the other's env) built with the
default policy (`sandboxed`: uv tries without building first, so no sandbox is made)
against `--build-policy wheels-only` (which never makes one): no slowdown expected; and an env with
an sdist (`sgmllib3k`, which PyPI has only as an sdist) built in the sandbox (as the build
user, its own mount namespace and its own empty uv cache, so the build backend is fetched
each time) against uv building the same sdist as root from the shared cache with the built
wheel refreshed (`uv pip install --refresh-package`), as envfs did before the sandbox.
Always exits 0: it measures.
Usage: scripts/bench/build [--trials N] [--cold] [--sandbox] [--only NAME] [--python V]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _envfs import EnvfsHarness

from envfs.build import interpreters
from envfs.build.uv import uv_binary

#: (node, import statement, packages)
SETS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("requests", "import requests", ("requests==2.32.3",)),
    ("pandas", "import pandas", ("pandas==2.2.3", "numpy==2.1.3")),
    ("sklearn", "import sklearn", ("scikit-learn==1.5.2",)),
    ("fastapi", "import fastapi, pydantic", ("fastapi==0.115.5", "pydantic==2.10.2")),
    ("sympy", "import sympy", ("sympy==1.13.3",)),
)
WARM_SIX = "1.16.0"
TRIAL_SIX = ("1.15.0", "1.14.0", "1.13.0", "1.12.0", "1.11.0")
TARGET = 1.5


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench(EnvfsHarness):
    def __init__(self, root: Path, python: str) -> None:
        super().__init__(root, python)
        self.base_python = interpreters.find(python).path

    def ours(self, node: str, code: str, pkgs: list[str]) -> tuple[float, float, dict[str, float]]:
        """Seconds for bind and for the first import (which builds); the build's phases."""
        t0 = time.perf_counter()
        self.cli("bind", f"bench/{node}", *pkgs, "--python", self.python)
        t1 = time.perf_counter()
        python = self.mnt / "bench" / node / "bin" / "python"
        done = subprocess.run([str(python), "-c", code], env=self.run_env, capture_output=True)
        t2 = time.perf_counter()
        if done.returncode != 0:
            raise RuntimeError(f"{python} -c {code!r}: {done.stderr.decode()[-400:]}")
        info = json.loads(self.cli("show", f"bench/{node}", "--json"))
        manifest = Path(info["snapshot_path"]) / ".envfs" / "manifest.json"
        phases: dict[str, float] = json.loads(manifest.read_text())["durations"]
        return t1 - t0, t2 - t1, phases

    def floor(self, where: Path, code: str, pkgs: list[str], cache: Path) -> float:
        env = dict(self.run_env, UV_CACHE_DIR=str(cache), UV_PYTHON_DOWNLOADS="never")
        t0 = time.perf_counter()
        uv = uv_binary()
        subprocess.run(
            [uv, "venv", "-q", "--python", self.base_python, str(where)], env=env, check=True
        )
        subprocess.run(
            [uv, "pip", "install", "-q", "--link-mode", "hardlink", "--python",
             str(where / "bin" / "python"), *pkgs],
            env=env,
            check=True,
        )  # fmt: skip
        subprocess.run([str(where / "bin" / "python"), "-c", code], env=env, check=True)
        return time.perf_counter() - t0


def warm(b: Bench, sets: list[tuple[str, str, tuple[str, ...]]], trials: int) -> None:
    for node, _code, pkgs in sets:
        t0 = time.monotonic()
        b.cli("build", f"warm/{node}", *pkgs, f"six=={WARM_SIX}", "--python", b.python)
        say(f"warm-up build of {node} in {time.monotonic() - t0:.0f} s")
    for v in TRIAL_SIX[:trials]:  # every six the trials use, into the uv cache
        b.cli("build", f"warm/six{v.replace('.', '')}", f"six=={v}", "--python", b.python)


def run_sets(b: Bench, sets: list[tuple[str, str, tuple[str, ...]]], trials: int) -> list[str]:
    lines = []
    cache = b.root / "store" / "uv-cache"
    for node, code, pkgs in sets:
        ours: list[float] = []
        floors: list[float] = []
        details = []
        for k in range(trials):
            six = f"six=={TRIAL_SIX[k]}"
            where = b.root / f"floor-{node}-{k}"
            for side in ("floor", "ours") if k % 2 == 0 else ("ours", "floor"):
                if side == "floor":
                    floors.append(b.floor(where, code, [*pkgs, six], cache))
                else:
                    details.append(b.ours(f"{node}{k}", code, [*pkgs, six]))
            bind, first, _ = details[-1]
            ours.append(bind + first)
            shutil.rmtree(where, ignore_errors=True)
            say(f"{node} trial {k + 1}: ours {ours[-1]:.2f} s, floor {floors[-1]:.2f} s")
        o, f = statistics.median(ours), statistics.median(floors)
        verdict = "OK" if o / f <= TARGET else "OVER"
        line = f"{node:9s} ours {o:6.2f} s   uv floor {f:6.2f} s   ratio {o / f:5.2f}x   "
        line += f"target <= {TARGET:.1f}x {verdict}"
        bind = statistics.median(d[0] for d in details)
        first = statistics.median(d[1] for d in details)
        phases = {p: statistics.median(d[2].get(p, 0.0) for d in details) for p in details[0][2]}
        build = sum(phases.values())
        parts = ", ".join(f"{p} {s:.2f}" for p, s in phases.items())
        line += (
            f"\n{'':9s} bind (lock) {bind:.2f} s; first import {first:.2f} s "
            f"= build {build:.2f} s ({parts}) + publish, import"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


SDIST = ("sgmllib3k==1.0.0",)
#: A new env per policy and trial (requests with its certifi pinned: wheels on PyPI).
POLICY_PINS = {
    "sandboxed": ("certifi==2024.2.2", "certifi==2024.6.2", "certifi==2024.7.4"),
    "wheels-only": ("certifi==2024.8.30", "certifi==2024.12.14", "certifi==2025.1.31"),
}


def sandbox_rows(b: Bench, trials: int) -> list[str]:
    """Wheels: default policy vs wheels-only. An sdist: sandboxed vs uv as root."""
    cache = b.root / "store" / "uv-cache"
    uv = uv_binary()
    wheels = [*SETS[0][2]]  # requests

    def as_root(where: Path, six: str) -> None:
        """uv as root from the shared cache, the sdist's cached wheel refreshed (rebuilt)."""
        env = dict(b.run_env, UV_CACHE_DIR=str(cache), UV_PYTHON_DOWNLOADS="never")
        subprocess.run([uv, "venv", "-q", "--python", b.base_python, str(where)],
                       env=env, check=True)  # fmt: skip
        subprocess.run(
            [uv, "pip", "install", "-q", "--link-mode", "hardlink", "--refresh-package",
             "sgmllib3k", "--python", str(where / "bin" / "python"), *SDIST, six],
            env=env, check=True,
        )  # fmt: skip
        shutil.rmtree(where, ignore_errors=True)

    # warm-up, untimed: every package (and the sdist's build backend) in the caches; each
    # policy's trials get their own certifi pins, so neither reuses the other's env
    b.cli("build", "warm/sdist", *SDIST, f"six=={WARM_SIX}", "--python", b.python)
    b.cli("build", "warm/wheels", *wheels, f"six=={WARM_SIX}", "--python", b.python)
    for policy, pins in POLICY_PINS.items():
        for pin in pins[:trials]:
            b.cli("build", f"warm/{policy}-{pin[-4:]}", pin, "--python", b.python)
    as_root(b.root / "root-warm", f"six=={WARM_SIX}")
    lines = []
    times: dict[str, list[float]] = {"sandboxed": [], "wheels-only": [], "ours": [], "root": []}
    for k in range(min(trials, 3)):
        six = f"six=={TRIAL_SIX[k]}"
        for policy in ("sandboxed", "wheels-only") if k % 2 == 0 else ("wheels-only", "sandboxed"):
            t0 = time.perf_counter()
            pin = POLICY_PINS[policy][k]
            b.cli("build", f"policy/{policy}{k}", *wheels, pin, "--python", b.python,
                  "--build-policy", policy)  # fmt: skip
            times[policy].append(time.perf_counter() - t0)
        for side in ("root", "ours") if k % 2 == 0 else ("ours", "root"):
            t0 = time.perf_counter()
            if side == "ours":
                b.cli("build", f"sdist/n{k}", *SDIST, six, "--python", b.python)
            else:
                as_root(b.root / f"root-sdist-{k}", six)
            times[side].append(time.perf_counter() - t0)
        say(f"sandbox trial {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()))
    med = {n: statistics.median(v) for n, v in times.items()}
    sandboxed, wheels_only = med["sandboxed"], med["wheels-only"]
    lines.append(
        f"wheels    sandboxed policy {sandboxed:6.2f} s   wheels-only {wheels_only:6.2f} s   "
        f"ratio {sandboxed / wheels_only:5.2f}x   (requests; no slowdown expected)"
    )
    lines.append(
        f"sdist     sandboxed build {med['ours']:6.2f} s   uv as root {med['root']:6.2f} s   "
        f"ratio {med['ours'] / med['root']:5.2f}x   (sgmllib3k: the cost of building unprivileged)"
    )
    for line in lines:
        print(line, flush=True)
    return lines


def cold(python: str) -> str:
    """pandas from nothing: an empty store and uv cache on both sides.

    The interpreter is captured first and timed apart: a store does that once, ever.
    """
    node, code, pkgs = SETS[1]
    with tempfile.TemporaryDirectory(prefix="envfs-bench-build-cold.") as tmp:
        b = Bench(Path(tmp), python)
        t0 = time.perf_counter()
        b.cli("python", "add", python)
        capture = time.perf_counter() - t0
        b.mount()
        try:
            floor = b.floor(Path(tmp) / "floor", code, list(pkgs), Path(tmp) / "floor-cache")
            bind, first, phases = b.ours(node, code, list(pkgs))
        finally:
            b.umount()
            subprocess.run(["chmod", "-R", "u+w", tmp], check=False)
    ours = bind + first
    parts = ", ".join(f"{p} {s:.2f}" for p, s in phases.items())
    return (
        f"cold      ours {ours:6.2f} s   uv floor {floor:6.2f} s   ratio {ours / floor:5.2f}x   "
        f"(pandas, downloads included; bind {bind:.2f} s, build phases: {parts}; "
        f"capturing the interpreter before it, once per store: {capture:.2f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="new specs per env (max 5)")
    parser.add_argument("--cold", action="store_true", help="add the cold-cache pandas row")
    parser.add_argument("--sandbox", action="store_true", help="add the build-sandbox rows")
    parser.add_argument("--only", help="one env by name (requests, pandas, sklearn, ...)")
    parser.add_argument("--python", default="3.12")
    args = parser.parse_args()
    trials = max(1, min(args.trials, len(TRIAL_SIX)))
    sets = [s for s in SETS if args.only in (None, s[0])]
    root = Path(tempfile.mkdtemp(prefix="envfs-bench-build."))
    b = Bench(root, args.python)
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        say("warm-up: build every env once (fills the uv cache and the bytecode pool)")
        warm(b, sets, trials)
        b.mount()
        lines = run_sets(b, sets, trials)
        if args.sandbox:
            say("sandbox: wheels by policy; an sdist sandboxed vs uv as root")
            lines += sandbox_rows(b, trials)
        if args.cold:
            say("cold: pandas with an empty store and uv cache on both sides")
            lines.append(cold(args.python))
            print(lines[-1], flush=True)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"benchmark stopped: {e}", flush=True)
    finally:
        b.umount()
        if not os.path.ismount(b.mnt):
            subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
            subprocess.run(["rm", "-rf", str(root)], check=False)
    print()
    print(f"summary ({time.monotonic() - t0:.0f} s; medians of {trials} trials; ratio = ours / uv)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
