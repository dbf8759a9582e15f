"""Start-up and import speed through the mount vs the same env on local disk.

Sets: `python -c pass` (start-up), pandas+numpy, sympy.

Builds real envs in a throwaway store, mounts it, and times `python -c "import M"` through
MNT/WF/NODE/bin/python against the very same snapshot on local disk (read directly from a
local store; with --nas, the node cache's copy). Interleaved runs, medians, ratios, for:
warm caches (target <= 1.05x), the first run after a fresh mount (<= 1.15x), a cold page
cache after drop_caches (<= 1.15x, both sides cold), 1/4/16 processes at once (<= 1.10x at
16); the daemon's CPU per warm `import numpy` (<= 3 ms); with --nas, the store on
scripts/nas-sim (1 ms a request) and the NAS requests per warm import once the node holds
the env (target 0). Then binds 100 workflow nodes to the snapshots, imports through each
and reads the daemon's RSS (target < 150 MB). Always exits 0: it measures.
Usage: scripts/bench/imports [--runs N] [--rounds K] [--envs E] [--skip-cold] [--python V]
                             [--root DIR] [--nas] [--fuse-only] [--plot PNG]
With --root the store is kept in DIR and reused by the next run (builds are then instant).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _envfs import EnvfsHarness

from envfs.core.config import Settings
from envfs.core.errors import EnvfsError
from envfs.service.envs import Service

#: (node name, module to import, requirements); module "" times `python -c pass` (start-up:
#: the interpreter and the standard library it loads, all served by the mount too)
SETS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("start", "", ("six==1.16.0",)),
    ("pandas", "pandas", ("pandas==2.2.3", "numpy==2.1.3")),
    ("sympy", "sympy", ("sympy==1.13.3",)),
)
WARM_TARGET, WARM_AIM, FIRST_TARGET, COLD_TARGET = 1.05, 1.05, 1.15, 1.15
CONCURRENCY = (1, 4, 16)
CONC_TARGET = 1.10  # at 16 processes
CPU_TARGET_MS = 3.0  # daemon CPU per warm `import numpy`
NAS_LATENCY_MS = 1.0
SCRIPTS = Path(__file__).resolve().parent.parent
RSS_TARGET_MB = 150.0
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
WARMUP = 3
#: (interpreter, where its times go), in the order they run
Series = list[tuple[Path, list[float]]]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    measure: str
    name: str
    mount: float  # median seconds
    local: float
    target: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.mount / self.local

    def line(self) -> str:
        verdict = "OK" if self.ratio <= self.target else "OVER"
        return (
            f"{self.measure:6s} {self.name:7s} mount {self.mount * 1000:8.1f} ms   "
            f"local {self.local * 1000:8.1f} ms   ratio {self.ratio:5.2f}x   "
            f"target <= {self.target:.2f}x  {verdict}{self.note}"
        )


class Bench(EnvfsHarness):
    def __init__(self, root: Path, python: str, nas: bool = False) -> None:
        super().__init__(root, python)
        self.nas: subprocess.Popen[bytes] | None = None
        self.nas_log = root / "nas-sim.log"
        if nas:
            self.start_nas()
        # no bytecode writes by the timed interpreters (we are root: a write would succeed
        # in the read-only local snapshot)
        self.run_env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.local: dict[str, Path] = {}
        self.sids: dict[str, str] = {}

    # -- envfs --------------------------------------------------------------------------------

    def build(self) -> None:
        for node, _module, reqs in SETS:
            t0 = time.monotonic()
            say(f"building bench/{node}: {' '.join(reqs)}")
            self.cli("build", f"bench/{node}", *reqs, "--python", self.python)
            info = json.loads(self.cli("show", f"bench/{node}", "--json"))
            self.local[node] = Path(info["snapshot_path"]) / "bin" / "python"
            self.sids[node] = info["snapshot_id"]
            say(f"built bench/{node} in {time.monotonic() - t0:.0f} s -> {info['snapshot_path']}")

    def mount(self, ready: Callable[[], bool] | None = None) -> None:
        super().mount(ready or (lambda: bool(os.listdir(self.mnt / "bench"))))

    # -- the store on nas-sim -----------------------------------------------------------------

    def start_nas(self) -> None:
        """Put the store on scripts/nas-sim (NAS_LATENCY_MS a request, no attribute cache)."""
        backing, mnt = self.root / "nas-backing", self.root / "nas"
        backing.mkdir(exist_ok=True)
        mnt.mkdir(exist_ok=True)
        with open(self.nas_log, "ab") as log:
            self.nas = subprocess.Popen(
                [str(SCRIPTS / "nas-sim"), str(backing), str(mnt), "--latency-ms",
                 str(NAS_LATENCY_MS)],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if self.nas.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nas-sim did not mount; see {self.nas_log}")
            time.sleep(0.2)
        self.env["ENVFS_STORE"] = str(mnt / "store")
        say(f"store on nas-sim ({NAS_LATENCY_MS} ms a request) at {mnt}")

    def stop_nas(self) -> None:
        if self.nas is not None and self.nas.poll() is None:
            self.nas.terminate()
            self.nas.wait(timeout=30)

    def nas_counts(self) -> dict[str, int]:
        """nas-sim's request counts so far (SIGUSR2 makes it print them)."""
        assert self.nas is not None
        before = self.nas_log.read_text().count("\n{")
        self.nas.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while self.nas_log.read_text().count("\n{") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [x for x in self.nas_log.read_text().splitlines() if x.startswith("{")]
        counts: dict[str, int] = json.loads(lines[-1])
        return counts

    def use_node_copies(self) -> None:
        """With the store on the NAS, the local-disk side is the node cache's copy (the same
        bytes); wait until the daemon has made it for every set."""
        for node, module, _ in SETS:
            self.timed(self.through_mount(node), module)  # first use: the copy starts
        deadline = time.monotonic() + 600
        for node, _module, _ in SETS:
            copy = self.root / "index" / "cache" / "snapshots" / self.sids[node]
            while not (copy / ".envfs" / "manifest.json").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no node cache copy of bench/{node} after 10 minutes")
                time.sleep(1)
            self.local[node] = copy / "bin" / "python"
        say("the node holds a copy of every env; local side = those copies")

    def stats(self) -> dict[str, int]:
        """The daemon's cache counters (its status file is rewritten within a second)."""
        time.sleep(1.2)
        for m in json.loads(self.cli("status", "--json"))["mounts"]:
            if m.get("mountpoint") == str(self.mnt) and m.get("alive"):
                cache: dict[str, int] = m["cache"]
                return cache
        return {}

    def rss(self) -> tuple[float, float]:
        """VmRSS and VmHWM of the daemon, MB (10^6 bytes)."""
        assert self.daemon is not None
        values: dict[str, float] = {}
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e6
        return values["VmRSS"], values["VmHWM"]

    # -- timing -------------------------------------------------------------------------------

    def through_mount(self, node: str, wf: str = "bench") -> Path:
        return self.mnt / wf / node / "bin" / "python"

    def run(self, python: Path, module: str, code: str | None = None) -> tuple[float, str]:
        t0 = time.perf_counter()
        done = subprocess.run(
            [str(python), "-c", code or (f"import {module}" if module else "pass")],
            env=self.run_env,
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{python} -c 'import {module}': {done.stderr.strip()[-500:]}")
        return elapsed, done.stdout

    def timed(self, python: Path, module: str) -> float:
        return self.run(python, module)[0]


def delta(after: dict[str, int], before: dict[str, int]) -> str:
    keys = ("lookups", "cold", "opens", "reads_inline", "reads_threaded")
    return ", ".join(f"{k} {after.get(k, 0) - before.get(k, 0)}" for k in keys)


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def cold_problem() -> str | None:
    try:
        drop_caches()
    except OSError as e:
        return f"cannot write {DROP_CACHES}: {e}"
    return None


def warm(b: Bench, runs: int, rows: list[Row]) -> None:
    say(f"warm: {WARMUP} warm-up runs, then {runs} interleaved pairs per set")
    for node, module, _ in SETS:
        for _ in range(WARMUP):
            b.timed(b.through_mount(node), module)
            b.timed(b.local[node], module)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n, _, _ in SETS}
    for i in range(runs):
        for node, module, _ in SETS:
            m, loc = times[node]
            order: Series = [(b.through_mount(node), m), (b.local[node], loc)]
            for python, out in order if i % 2 == 0 else order[::-1]:
                out.append(b.timed(python, module))
    for node, module, _ in SETS:
        before = b.stats()
        b.timed(b.through_mount(node), module)
        counts = delta(b.stats(), before)
        m, loc = times[node]
        row = Row("warm", node, statistics.median(m), statistics.median(loc), WARM_TARGET)
        row.note = f"  (aim {WARM_AIM:.2f}x: {'met' if row.ratio <= WARM_AIM else 'missed'})"
        rows.append(row)
        print(row.line(), flush=True)
        print(f"       {node:7s} daemon requests per warm import: {counts}", flush=True)


def first_after_mount(b: Bench, rounds: int, rows: list[Row]) -> None:
    say(f"first run after mount: {rounds} rounds of umount, mount, one run per set")
    for node, module, _ in SETS:
        m: list[float] = []
        loc: list[float] = []
        counts = ""
        for k in range(rounds):
            b.umount()
            b.mount()
            before = b.stats() if k == 0 else {}
            m.append(b.timed(b.through_mount(node), module))
            loc.append(b.timed(b.local[node], module))
            if k == 0:
                counts = delta(b.stats(), before)
        row = Row("first", node, statistics.median(m), statistics.median(loc), FIRST_TARGET)
        rows.append(row)
        print(row.line(), flush=True)
        print(f"       {node:7s} daemon requests for the first import: {counts}", flush=True)


def cold(b: Bench, rounds: int, rows: list[Row]) -> None:
    say(f"cold page cache: {rounds} rounds, drop_caches before every run")
    for node, module, _ in SETS:
        m: list[float] = []
        loc: list[float] = []
        counts = ""
        for k in range(rounds):
            pairs: Series = [(b.through_mount(node), m), (b.local[node], loc)]
            for python, out in pairs if k % 2 == 0 else pairs[::-1]:
                before = b.stats() if k == 0 and out is m else {}
                drop_caches()
                out.append(b.timed(python, module))
                if k == 0 and out is m:
                    counts = delta(b.stats(), before)
        row = Row("cold", node, statistics.median(m), statistics.median(loc), COLD_TARGET)
        rows.append(row)
        print(row.line(), flush=True)
        print(f"       {node:7s} daemon requests for a cold import: {counts}", flush=True)


def concurrent(b: Bench, rounds: int, rows: list[Row]) -> None:
    """1, 4 and 16 processes importing pandas at once: wall time until the last is done."""
    node, module = "pandas", "pandas"
    say(f"concurrency: {rounds} interleaved rounds of {CONCURRENCY} processes at once")

    def burst(python: Path, n: int) -> float:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [str(python), "-c", f"import {module}"],
                env=b.run_env,
                cwd="/",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(n)
        ]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"{python}: a concurrent import of {module} failed")
        return time.perf_counter() - t0

    for n in CONCURRENCY:
        m: list[float] = []
        loc: list[float] = []
        for k in range(rounds):
            pairs: Series = [(b.through_mount(node), m), (b.local[node], loc)]
            for python, out in pairs if k % 2 == 0 else pairs[::-1]:
                out.append(burst(python, n))
        row = Row(f"conc{n}", node, statistics.median(m), statistics.median(loc), CONC_TARGET)
        rows.append(row)
        print(row.line(), flush=True)


def daemon_cpu(b: Bench, imports: int = 20) -> float:
    """Milliseconds of daemon CPU per warm `import numpy` (the daemon and its threads)."""
    assert b.daemon is not None
    python = b.through_mount("pandas")
    for _ in range(WARMUP):
        b.timed(python, "numpy")
    stat = Path(f"/proc/{b.daemon.pid}/stat")

    def ticks() -> int:
        return sum(int(x) for x in stat.read_text().rsplit(")", 1)[1].split()[11:15])

    t0 = ticks()
    for _ in range(imports):
        b.timed(python, "numpy")
    ms = (ticks() - t0) * 1000 / os.sysconf("SC_CLK_TCK") / imports
    verdict = "OK" if ms <= CPU_TARGET_MS else "OVER"
    print(f"cpu    daemon CPU per warm `import numpy`: {ms:.2f} ms  target <= "
          f"{CPU_TARGET_MS:.0f} ms {verdict}", flush=True)  # fmt: skip
    return ms


def nas_requests(b: Bench, imports: int = 10) -> float:
    """NAS requests per warm `import pandas` once the node holds the env: the requests made
    while importing, less what the daemon's own polling makes in as long without imports
    (measured over 3x as long, so its ups and downs average out)."""
    python = b.through_mount("pandas")
    b.timed(python, "pandas")
    before = b.nas_counts()
    t0 = time.monotonic()
    for _ in range(imports):
        b.timed(python, "pandas")
    busy = time.monotonic() - t0
    during = b.nas_counts()
    time.sleep(3 * busy)
    idle = b.nas_counts()

    def diff(x: dict[str, int], y: dict[str, int], keys: tuple[str, ...] | None = None) -> int:
        return sum(x.get(k, 0) - y.get(k, 0) for k in keys or tuple(x))

    polling = diff(idle, during) / (3 * busy)  # requests per second without imports
    per = max(0.0, (diff(during, before) - polling * busy) / imports)
    files = {k: during.get(k, 0) - before.get(k, 0) for k in ("open", "read")}
    verdict = "OK" if files["open"] == files["read"] == 0 else "OVER"
    print(f"nas    NAS requests per warm `import pandas`: {per:.1f} beyond the daemon's "
          f"polling ({polling:.1f}/s); NAS opens {files['open']}, reads {files['read']} in "
          f"{imports} imports  target 0 {verdict}", flush=True)  # fmt: skip
    return per


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Ratios (mount / local disk) by measure and set, with each measure's target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (scripts/setup installs it)", flush=True)
        return
    measures = list(dict.fromkeys(r.measure for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, measure in enumerate(measures):
            row = next((r for r in rows if r.measure == measure and r.name == name), None)
            if row is not None:
                xs.append(j + i * width)
                ys.append(row.ratio)
        ax.bar(xs, ys, width, label=name)
    for j, measure in enumerate(measures):
        target = next(r.target for r in rows if r.measure == measure)
        ax.hlines(target, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dashed")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(measures))], measures)
    ax.set_ylabel("mount / local disk (median)")
    ax.set_title(title + " (dashed: target)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}", flush=True)


def daemon_rss(b: Bench, envs: int) -> tuple[float, float, int]:
    say(f"daemon RSS: binding bench100/e000..e{envs - 1:03d} and importing through each")
    svc = Service(Settings.resolve(Path(b.env["ENVFS_STORE"]), b.root / "index"))
    for i in range(envs):
        node, _module, _ = SETS[i % len(SETS)]
        svc.bind("bench100", f"e{i:03d}", b.sids[node])
    deadline = time.monotonic() + 60  # the daemon follows the audit log
    while time.monotonic() < deadline:
        try:
            if len(os.listdir(b.mnt / "bench100")) >= envs:
                break
        except OSError:
            pass
        time.sleep(0.5)
    rss0, _ = b.rss()
    say(f"daemon RSS before: {rss0:.1f} MB")
    t0 = time.monotonic()
    for i in range(envs):
        node, module, _ = SETS[i % len(SETS)]
        b.timed(b.through_mount(f"e{i:03d}", "bench100"), module)
        if (i + 1) % 10 == 0:
            rss, _ = b.rss()
            say(f"imported through {i + 1} envs ({time.monotonic() - t0:.0f} s), RSS {rss:.1f} MB")
    views = b.stats().get("views", -1)
    rss, hwm = b.rss()
    return rss, hwm, views


def check_paths(b: Bench) -> None:
    """Both interpreters must import from where we think (the mount, the store)."""
    for node, module, _ in SETS:
        if not module:
            continue
        mount_env = b.mnt / "bench" / node
        for python, where in ((b.through_mount(node), mount_env), (b.local[node], None)):
            where = where or python.parent.parent
            code = f"import {module}, sys; print({module}.__file__); print(sys.prefix)"
            _, out = b.run(python, module, code)
            if not all(line.startswith(str(where)) for line in out.split()):
                raise RuntimeError(f"{python} imports {module} from elsewhere: {out.split()}")
            say(f"{python}: {module} from {out.split()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="warm interleaved pairs per set")
    parser.add_argument("--rounds", type=int, default=5, help="first-run and cold rounds")
    parser.add_argument("--envs", type=int, default=100, help="envs served for the RSS check")
    parser.add_argument("--skip-cold", action="store_true", help="skip the drop_caches runs")
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--root", type=Path, help="keep the store here and reuse it")
    parser.add_argument("--nas", action="store_true", help="put the store on scripts/nas-sim")
    parser.add_argument(
        "--fuse-only",
        action="store_true",
        help="serve through FUSE only (--no-kernel-mounts): how a fresh node serves an env "
        "until its whole copy is in",
    )
    parser.add_argument("--plot", type=Path, help="write the ratios as a PNG bar chart here")
    args = parser.parse_args()
    keep = args.root is not None
    if keep:
        args.root.mkdir(parents=True, exist_ok=True)
    root = args.root.resolve() if keep else Path(tempfile.mkdtemp(prefix="envfs-bench-imports."))
    b = Bench(root, args.python, nas=args.nas)
    if args.fuse_only:
        b.mount_args = ["--no-kernel-mounts"]
        say("serving through FUSE only (no kernel mounts)")
    rows: list[Row] = []
    rss: tuple[float, float, int] | None = None
    t0 = time.monotonic()
    skipped = "--skip-cold" if args.skip_cold else cold_problem()
    try:
        b.build()
        b.mount()
        if args.nas:
            b.use_node_copies()
        check_paths(b)
        steps: list[Callable[[], Any]] = [
            lambda: warm(b, args.runs, rows),
            lambda: concurrent(b, args.rounds, rows),
            lambda: daemon_cpu(b),
        ]
        if args.nas:
            steps.append(lambda: nas_requests(b))
        steps.append(lambda: first_after_mount(b, args.rounds, rows))
        if skipped is None:
            steps.append(lambda: cold(b, args.rounds, rows))
        else:
            print(f"cold   skipped: {skipped}", flush=True)
        for step in steps:
            step()
        rss = daemon_rss(b, args.envs)
    except (RuntimeError, OSError, subprocess.SubprocessError, EnvfsError) as e:
        print(f"benchmark stopped: {e}", flush=True)
        if b.log.exists():
            tail = b.log.read_text(errors="replace").strip().splitlines()[-5:]
            print("daemon log tail:\n  " + "\n  ".join(tail), flush=True)
    finally:
        b.umount()
        b.stop_nas()
        if os.path.ismount(b.mnt):
            print(f"warning: {b.mnt} is still mounted; keeping {root}", file=sys.stderr)
        elif not keep:
            subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
            subprocess.run(["rm", "-rf", str(root)], check=False)
    print()
    print(f"summary ({time.monotonic() - t0:.0f} s; medians; ratio = mount / local disk)")
    print(f"{'measure':8s} {'set':7s} {'mount ms':>9s} {'local ms':>9s} {'ratio':>6s}  target")
    for r in rows:
        verdict = "OK" if r.ratio <= r.target else "OVER"
        print(
            f"{r.measure:8s} {r.name:7s} {r.mount * 1000:9.1f} {r.local * 1000:9.1f} "
            f"{r.ratio:5.2f}x  <= {r.target:.2f}x {verdict}"
        )
    if skipped is not None:
        print(f"{'cold':8s} skipped: {skipped}")
    if rss is not None:
        value, peak, views = rss
        verdict = "OK" if value < RSS_TARGET_MB else "OVER"
        print(
            f"{'rss':8s} daemon after serving {args.envs} envs ({views} views): "
            f"{value:.1f} MB (peak {peak:.1f} MB)  < {RSS_TARGET_MB:.0f} MB {verdict}"
        )

    if args.plot is not None and rows:
        where = "store on nas-sim" if args.nas else "store on local disk"
        plot(rows, args.plot, f"imports through envfs, {where}")


if __name__ == "__main__":
    main()
