"""What a node costs as the store grows: 100 to 100,000 bindings on a NAS (nas-sim, 1 ms).

For each size, in one run: bind N workflow nodes to one built env (`envfs bind --batch`, on
the local backing directory), serve the store through `scripts/nas-sim` at --latency-ms,
then on a node that never saw it (a fresh index): time until `envfs mount` has mounted, the
first `import six` through it, the NAS requests a second of the idle daemon (after a
warm-up), `envfs ls --json`, the API's `GET /envs/{wf}/{node}` p99 (one client, the API on
the same node index), `envfs gc --dry-run`, and the daemon's RSS. Prints a table, writes
--json and a plot (--png). The env is `six` from the index uv is configured with.
With --nodes K, then K daemons (own index and host id) on one store of --nodes-bindings:
their idle NAS requests/s together, and how long a rebind made on another node takes to
show through all K mounts.
Usage: scripts/bench/scale [--sizes 100,1000,10000,100000] [--idle S] [--png FILE] [--nodes K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api import Load, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
NODES_PER_WORKFLOW = 100


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "envfs", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"envfs {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class Nas:
    """scripts/nas-sim over ``backing`` at ``mnt``, with its request counts."""

    def __init__(self, backing: Path, mnt: Path, latency_ms: float) -> None:
        mnt.mkdir(exist_ok=True)
        self.counts_path = mnt.parent / "counts.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/nas_sim.py"), str(backing), str(mnt),
             "--latency-ms", str(latency_ms), "--counts", str(self.counts_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("nas-sim did not start")
        self.mnt = mnt

    def requests(self) -> int:
        before = self.counts_path.stat().st_mtime_ns if self.counts_path.exists() else 0
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.counts_path.exists() and self.counts_path.stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
        counts = json.loads(self.counts_path.read_text())
        return sum(v for k, v in counts.items() if isinstance(v, int) and "bytes" not in k)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def make_store(
    root: Path, base: dict[str, str], n: int, args: argparse.Namespace, name: str
) -> tuple[Path, float, str]:
    """A backing store with ``n`` nodes bound to six 1.16 (and s/b on six 1.15): its path,
    the bulk bind's seconds, and the 1.15 snapshot's id."""
    backing = root / f"back-{name}"
    env = dict(base, ENVFS_STORE=str(backing), ENVFS_INDEX=str(root / f"index-{name}-writer"))
    cli(env, "build", "s/a", "six==1.16.0", "--python", args.python)
    cli(env, "build", "s/b", "six==1.15.0", "--python", args.python)
    sid = json.loads(cli(env, "show", "s/a", "--json"))["snapshot_id"]
    other = json.loads(cli(env, "show", "s/b", "--json"))["snapshot_id"]
    lines = "".join(
        f"wf{i // NODES_PER_WORKFLOW:04d}/n{i % NODES_PER_WORKFLOW:03d} {sid}\n" for i in range(n)
    )
    t0 = time.perf_counter()
    cli(env, "bind", "--batch", "-", stdin=lines)
    return backing, time.perf_counter() - t0, other


def start_daemon(root: Path, node: dict[str, str], mnt: Path, log: Path) -> subprocess.Popen[bytes]:
    mnt.mkdir()
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "envfs", "mount", str(mnt), "--foreground"],
            env=node, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    t0 = time.perf_counter()
    while not os.path.ismount(mnt):
        if daemon.poll() is not None or time.perf_counter() - t0 > 600:
            raise RuntimeError(f"no mount; see {log}")
        time.sleep(0.02)
    return daemon


def many_nodes(root: Path, base: dict[str, str], n: int, k: int, args: argparse.Namespace) -> str:
    """``k`` daemons (own index and host id) on one nas-sim store of ``n`` bindings: their
    idle NAS requests/s together, and how long a rebind on one takes to show on all."""
    backing, _bind_s, other = make_store(root, base, n, args, f"nodes-{n}")
    nas = Nas(backing, root / f"nas-nodes-{n}", args.latency_ms)
    daemons = []
    mounts = []
    try:
        for j in range(k):
            node = dict(
                base,
                ENVFS_STORE=str(nas.mnt),
                ENVFS_INDEX=str(root / f"index-node{j}"),
                ENVFS_HOST=f"node-{j}",
                XDG_RUNTIME_DIR=str(root / f"run-node{j}"),
            )
            mnt = root / f"envs-node{j}"
            daemons.append(start_daemon(root, node, mnt, root / f"daemon-node{j}.log"))
            mounts.append(mnt)
            subprocess.run([mnt / "wf0000/n000/bin/python", "-c", "import six"], check=True)
        time.sleep(args.warmup)
        c0 = nas.requests()
        time.sleep(args.idle)
        idle = (nas.requests() - c0) / args.idle
        writer = dict(base, ENVFS_STORE=str(nas.mnt), ENVFS_INDEX=str(root / "index-rebinder"))
        t0 = time.perf_counter()
        cli(writer, "bind", "wf0000/n000", "--snapshot", other)
        seen: dict[int, float] = {}
        while len(seen) < k and time.perf_counter() - t0 < 30:
            for j, mnt in enumerate(mounts):
                if j not in seen:
                    with contextlib.suppress(OSError):
                        if os.getxattr(mnt / "wf0000/n000", "user.envfs.id").decode() == other:
                            seen[j] = time.perf_counter() - t0
            time.sleep(0.02)
        slowest = max(seen.values()) if len(seen) == k else float("inf")
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        for d in daemons:
            d.wait(timeout=60)
        nas.stop()
    return (
        f"{k} daemons on one nas-sim store of {n:,} bindings: idle {idle:.2f} NAS requests/s "
        f"together; a rebind on another node seen through all {k} mounts after "
        f"{slowest:.2f} s (bind command included)"
    )


def mount_from_checkpoint(
    root: Path, base: dict[str, str], node: dict[str, str], backing: Path, n: int
) -> float:
    """`envfs index checkpoint` by the node that bound them all, then the seconds until a
    fresh node (own index and host id) has mounted, starting from that checkpoint."""
    writer = dict(base, ENVFS_STORE=str(backing), ENVFS_INDEX=str(root / f"index-{n}-writer"))
    cli(writer, "index", "checkpoint")
    run = root / f"run-{n}-fresh"
    run.mkdir(mode=0o700)
    index = root / f"index-{n}-fresh"
    fresh = dict(node, ENVFS_INDEX=str(index), ENVFS_HOST="fresh", XDG_RUNTIME_DIR=str(run))
    t0 = time.perf_counter()
    daemon = start_daemon(root, fresh, root / f"envs-{n}-fresh", root / f"daemon-{n}-fresh.log")
    took = time.perf_counter() - t0
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    return took


def measure(root: Path, base: dict[str, str], n: int, args: argparse.Namespace) -> dict[str, Any]:
    backing, bind_s, _other = make_store(root, base, n, args, str(n))
    row: dict[str, Any] = {"bindings": n, "bulk_bind_s": bind_s}
    nas = Nas(backing, root / f"nas-{n}", args.latency_ms)
    node = dict(
        base,
        ENVFS_STORE=str(nas.mnt),
        ENVFS_INDEX=str(root / f"index-{n}"),
        XDG_RUNTIME_DIR=str(root / f"run-{n}"),
    )
    mnt = root / f"envs-{n}"
    daemon = None
    try:
        t0 = time.perf_counter()
        daemon = start_daemon(root, node, mnt, root / f"daemon-{n}.log")
        row["mount_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([mnt / "wf0000/n000/bin/python", "-c", "import six"], check=True)
        row["first_import_s"] = time.perf_counter() - t0
        time.sleep(args.warmup)
        c0 = nas.requests()
        time.sleep(args.idle)
        row["idle_requests_per_s"] = (nas.requests() - c0) / args.idle
        t0 = time.perf_counter()
        listed = json.loads(cli(node, "ls", "--json"))
        row["ls_s"] = time.perf_counter() - t0
        assert len(listed) == n + 2, len(listed)  # and s/a, s/b
        t0 = time.perf_counter()
        cli(node, "gc", "--dry-run", "--json")
        row["gc_dry_run_s"] = time.perf_counter() - t0
        server, port, _log = start_server(root / f"run-{n}", node)
        try:
            paths = [
                f"/envs/wf{i // NODES_PER_WORKFLOW:04d}/n{i % NODES_PER_WORKFLOW:03d}"
                for i in range(0, n, max(1, n // 500))
            ]
            row["api_get_p99_ms"] = Load(port, paths, 1, args.api_seconds).measure()["p99"]
        finally:
            stop_server(server)
        with open(f"/proc/{daemon.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        row["daemon_rss_mb"] = rss / 1024
        row["mount_checkpoint_s"] = mount_from_checkpoint(root, base, node, backing, n)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        nas.stop()
    return row


COLUMNS = [
    ("bindings", "{:,}"),
    ("bulk_bind_s", "{:.1f}"),
    ("mount_s", "{:.2f}"),
    ("mount_checkpoint_s", "{:.2f}"),
    ("first_import_s", "{:.2f}"),
    ("idle_requests_per_s", "{:.2f}"),
    ("ls_s", "{:.2f}"),
    ("api_get_p99_ms", "{:.2f}"),
    ("gc_dry_run_s", "{:.1f}"),
    ("daemon_rss_mb", "{:.0f}"),
]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["mount_s", "idle_requests_per_s", "ls_s", "api_get_p99_ms", "daemon_rss_mb"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    xs = [r["bindings"] for r in rows]
    for ax, key in zip(axes, keys, strict=True):
        ax.plot(xs, [r[key] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_title(key)
        ax.set_xlabel("bindings")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before idle (10)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle seconds counted (30)")
    parser.add_argument("--api-seconds", type=float, default=5.0)
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--nodes", type=int, default=0, help="then K daemons on one store")
    parser.add_argument("--nodes-bindings", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="envfs-bench-scale."))
    base = dict(os.environ)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        say(f"{n:,} bindings")
        rows.append(measure(root, base, n, args))
        say("  " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k != "bindings"))
    print("| " + " | ".join(k for k, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fmt.format(r[k]) for k, fmt in COLUMNS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.png:
        plot(rows, args.png)
    if args.nodes:
        print(many_nodes(root, base, args.nodes_bindings, args.nodes, args))
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
    subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
