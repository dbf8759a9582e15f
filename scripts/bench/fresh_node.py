"""A fresh node's first run: the first import on nodes that have never seen the env.

For each --latency-ms (default 1) and each node count in --nodes (default 1,4), in one
run: build the env (--packages, default pandas + numpy) into a local backing store and
the same packages into a plain local venv (copied, bytecode compiled), serve the store
through `scripts/nas-sim`, then

- local cold: drop the page cache, K imports at once in the local venv (the slowest);
- fresh: K daemons, each with an empty index and node cache and its own host id, drop the
  page cache, K imports at once through them (the slowest), with the NAS requests and
  bytes read for them (per node) and the bytes of the files the build traced;
- with --sibling PACKAGES (at each latency, one node): a node that has run a sibling env
  (those packages: the same stack and one more) and holds it whole; the first import of
  the env there (the node has most of its files, not the env).

Prints one markdown row per (latency, K). Needs root (drop_caches, mounts) and PyPI.

    scripts/bench/fresh-node [--packages "pandas==2.2.3 numpy==2.1.3"] [--module pandas]
                             [--latency-ms 0.5,1,5] [--nodes 1,4] [--keep DIR]
                             [--sibling "pandas==2.2.3 numpy==2.1.3 packaging==24.2"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import Nas, cli, say, start_daemon  # type: ignore[import-not-found]


def base_python(version: str) -> str:
    """An installed CPython of ``version`` for the local venv (pyenv's, else on PATH)."""
    pyenv = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False)
    versions = Path(pyenv.stdout.strip() or "/nonexistent") / "versions"
    found = sorted(versions.glob(f"{version}*/bin/python{version}"))
    if found:
        return str(found[-1])
    return shutil.which(f"python{version}") or version


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_imports(pythons: list[str], module: str) -> float:
    """Seconds until the slowest of these imports (run at once) is done."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([p, "-c", f"import {module}"], stdout=subprocess.DEVNULL) for p in pythons
    ]
    worst = 0.0
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"import {module} failed")
        worst = max(worst, time.perf_counter() - t0)
    return worst


def nas_counts(nas: Nas) -> tuple[int, int]:
    requests = nas.requests()
    counts = json.loads(nas.counts_path.read_text())
    return requests, int(counts.get("read_bytes", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", default="pandas==2.2.3 numpy==2.1.3")
    parser.add_argument("--module", default="pandas")
    parser.add_argument("--latency-ms", default="1")
    parser.add_argument("--nodes", default="1,4")
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--keep", type=Path, help="use (and keep) this directory")
    parser.add_argument("--png", type=Path, help="plot the ratios and requests here")
    parser.add_argument("--sibling", help="also a node that has run an env of these packages")
    args = parser.parse_args()
    packages = args.packages.split()
    root = args.keep or Path(tempfile.mkdtemp(prefix="envfs-bench-fresh."))
    root.mkdir(parents=True, exist_ok=True)
    backing = root / "back"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    writer = dict(base, ENVFS_STORE=str(backing), ENVFS_INDEX=str(root / "index-writer"))
    say(f"building {' '.join(packages)}")
    cli(writer, "build", "bench/fresh", *packages, "--python", args.python)
    sid = json.loads(cli(writer, "show", "bench/fresh", "--json"))["snapshot_id"]
    if args.sibling:
        say(f"building the sibling {args.sibling}")
        cli(writer, "build", "bench/sibling", *args.sibling.split(), "--python", args.python)
    snap = backing / "snapshots" / sid
    traced = json.loads((snap / ".envfs/trace.json").read_text())["files"]
    traced_bytes = sum((snap / rel).stat().st_size for rel in traced)
    native = root / "native"
    if not (native / "bin/python").exists():
        say("making the local venv")
        subprocess.run(["uv", "venv", "-q", "--python", base_python(args.python), str(native)],
                       check=True)  # fmt: skip
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", str(native / "bin/python"), *packages],
            env=dict(base, UV_LINK_MODE="copy"),
            check=True,
        )
        subprocess.run(
            [str(native / "bin/python"), "-m", "compileall", "-q", str(native / "lib")],
            check=False,
            stdout=subprocess.DEVNULL,
        )
    rows = []
    for latency in [float(x) for x in args.latency_ms.split(",")]:
        nas = Nas(backing, root / f"nas-{latency}", latency)
        try:
            for k in [int(x) for x in args.nodes.split(",")]:
                rows.append(one_round(root, base, nas, k, latency, args.module, traced_bytes))
            if args.sibling:
                rows.append(sibling_round(root, base, nas, latency, args.module, traced_bytes))
        finally:
            nas.stop()
    print(
        "| latency | nodes | local cold | fresh node | ratio | NAS requests / node "
        "| NAS MB read / node | traced MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        nodes = "1, sibling's" if row["nodes"] == 0 else f"{row['nodes']}"
        print(
            f"| {row['latency']} ms | {nodes} | {row['local']:.2f} s | "
            f"{row['fresh']:.2f} s | {row['fresh'] / row['local']:.2f}x | "
            f"{row['requests']:,.0f} | {row['read_mb']:.1f} | {row['traced_mb']:.1f} |"
        )
    if args.png:
        plot(rows, args.png, f"first import {args.module}: {' '.join(packages)}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Fresh node / local cold, and NAS requests per node, against latency, a line per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ratio, requests) = plt.subplots(1, 2, figsize=(9, 3.4))
    for k in sorted({row["nodes"] for row in rows if row["nodes"]}):
        mine = sorted((r for r in rows if r["nodes"] == k), key=lambda r: r["latency"])
        xs = [r["latency"] for r in mine]
        ratio.plot(xs, [r["fresh"] / r["local"] for r in mine], marker="o", label=f"{k:g} node(s)")
        requests.plot(xs, [r["requests"] for r in mine], marker="o", label=f"{k:g} node(s)")
    ratio.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="target 1.5x")
    ratio.set_title("fresh node / local cold")
    requests.axhline(1000, color="grey", linestyle="--", linewidth=1, label="target 1,000")
    requests.set_title("NAS requests per node")
    for ax in (ratio, requests):
        ax.set_xlabel("NAS latency (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sibling_round(
    root: Path, base: dict[str, str], nas: Nas, latency: float, module: str, traced: int
) -> dict[str, float]:
    """A node that has run the sibling env, and holds it whole: the first import of the env
    there, against a local cold one (its row's ``nodes`` is 0)."""
    say(f"{latency} ms, a node that has run the sibling env")
    tag = f"{latency}-sibling-{time.monotonic_ns()}"
    mnt, log = root / f"mnt-{tag}", root / f"daemon-{tag}.log"
    daemon = start_daemon(root, node_env(root, base, nas, tag), mnt, log)
    try:
        timed_imports([str(mnt / "bench/sibling/bin/python")], module)
        deadline = time.monotonic() + 600
        while "copied to the node cache" not in log.read_text():  # the sibling, whole
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sibling env was not copied whole; see {log}")
            time.sleep(0.5)
        drop_caches()
        local = timed_imports([str(root / "native/bin/python")], module)
        before = nas_counts(nas)
        drop_caches()
        fresh = timed_imports([str(mnt / "bench/fresh/bin/python")], module)
        after = nas_counts(nas)
    finally:
        stop([daemon], [mnt])
    return row(latency, 0, local, fresh, before, after, traced)


def one_round(
    root: Path, base: dict[str, str], nas: Nas, k: int, latency: float, module: str, traced: int
) -> dict[str, float]:
    say(f"{latency} ms, {k} node(s)")
    drop_caches()
    local = timed_imports([str(root / "native/bin/python")] * k, module)
    daemons, mnts = [], []
    tag = f"{latency}-{k}-{time.monotonic_ns()}"
    try:
        for i in range(k):
            mnt = root / f"mnt-{tag}-{i}"
            node = node_env(root, base, nas, f"{tag}-{i}")
            daemons.append(start_daemon(root, node, mnt, root / f"daemon-{tag}-{i}.log"))
            mnts.append(mnt)
        time.sleep(1)
        before = nas_counts(nas)
        drop_caches()
        fresh = timed_imports([str(m / "bench/fresh/bin/python") for m in mnts], module)
        after = nas_counts(nas)
    finally:
        stop(daemons, mnts)
    return row(latency, k, local, fresh, before, after, traced)


def node_env(root: Path, base: dict[str, str], nas: Nas, tag: str) -> dict[str, str]:
    """A node on ``nas`` with its own (empty) index and node cache, and its own host id."""
    return dict(
        base,
        ENVFS_STORE=str(nas.mnt),
        ENVFS_INDEX=str(root / f"idx-{tag}"),
        ENVFS_HOST=f"node-{tag}",
        XDG_RUNTIME_DIR=str(root / f"run-{tag}"),
    )


def stop(daemons: list[subprocess.Popen[bytes]], mnts: list[Path]) -> None:
    """Stop the daemons (killed and their mounts lazily unmounted after 60 s)."""
    for daemon in daemons:
        daemon.send_signal(signal.SIGTERM)
    for daemon, mnt in zip(daemons, mnts, strict=False):
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def row(
    latency: float,
    nodes: int,
    local: float,
    fresh: float,
    before: tuple[int, int],
    after: tuple[int, int],
    traced: int,
) -> dict[str, float]:
    """One table row: NAS requests and MB read per node from the counts ``before`` and
    ``after`` (``nodes`` 0: one node, the sibling's)."""
    k = max(nodes, 1)
    return {
        "latency": latency,
        "nodes": nodes,
        "local": local,
        "fresh": fresh,
        "requests": (after[0] - before[0]) / k,
        "read_mb": (after[1] - before[1]) / k / 2**20,
        "traced_mb": traced / 2**20,
    }


if __name__ == "__main__":
    sys.exit(main())
