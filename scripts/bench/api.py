"""Read throughput and latency of the HTTP API: `GET /envs/{wf}/{node}` with 10,000 bindings
(target: p99 < 5 ms for one client), and `GET /healthz` (no store access) as the floor.

Builds one env once (a tiny wheel from a local wheelhouse: no network), binds --bindings
workflow nodes to its snapshot in-process (`Service.bind`, as `envfs bind` would, each a
revision file, an audit line and an index update), then starts a real `envfs serve-api`
(uvicorn, a subprocess) on loopback and, for each route and each client count, runs that
many threads for --seconds, each over one keep-alive `http.client` connection, asking for
random nodes. Prints requests/s, p50 and p99 (ms, client side: the client's own Python time
included) and whether the target is met. Always exits 0: it measures.
Usage: scripts/bench/api [--bindings N] [--seconds S] [--clients 1,8] [--python V]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from envfs.core.config import Settings
from envfs.service.envs import Service

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.wheels
from tests.wheels import make_wheel

TARGET_P99_MS = 5.0
NODES_PER_WORKFLOW = 100
TOKEN = "bench-token-0123456789"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def names(i: int) -> tuple[str, str]:
    return f"wf{i // NODES_PER_WORKFLOW:03d}", f"node{i % NODES_PER_WORKFLOW:03d}"


def make_store(root: Path, env: dict[str, str], bindings: int, python: str) -> tuple[float, float]:
    """Build one env with the CLI, then bind ``bindings`` nodes to it; (build s, bind s)."""
    wheels = root / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "bench-pkg", "1.0")
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "envfs", "build", "bench/first", "bench-pkg==1.0",
         "--python", python],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    build = time.perf_counter() - t0
    svc = Service(Settings.resolve(root / "store", root / "index"))
    sid = svc.show("bench", "first").snapshot_id
    t0 = time.perf_counter()
    for i in range(bindings):
        svc.bind(*names(i), sid)
        if i and i % 2000 == 0:
            say(f"  {i} bindings, {time.perf_counter() - t0:.1f} s")
    return build, time.perf_counter() - t0


def start_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, Path]:
    (root / "token").write_text(TOKEN + "\n")
    port = free_port()
    log = root / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "envfs", "serve-api", "--port", str(port),
             "--token-file", str(root / "token"), "--mount-path", "/envs"],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port, log
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve-api did not come up:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Load:
    """``clients`` threads asking for ``paths()`` over keep-alive connections."""

    def __init__(self, port: int, paths: list[str], clients: int, seconds: float) -> None:
        self.port, self.paths, self.clients, self.seconds = port, paths, clients, seconds
        self.latencies: list[list[float]] = [[] for _ in range(clients)]
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def client(self, k: int, until: float, record: bool) -> None:
        rng = random.Random(k)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        out = self.latencies[k]
        paths = self.paths
        try:
            while True:
                path = paths[rng.randrange(len(paths))]
                t0 = time.perf_counter()
                if t0 >= until:
                    break
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                t1 = time.perf_counter()
                if resp.status != 200:
                    with self.lock:
                        self.errors.append(f"{path}: {resp.status} {body[:200]!r}")
                    continue
                if record:
                    out.append(t1 - t0)
        except (OSError, http.client.HTTPException) as exc:
            with self.lock:
                self.errors.append(f"client {k}: {exc!r}")
        finally:
            conn.close()

    def run(self, seconds: float, record: bool) -> float:
        until = time.perf_counter() + seconds
        threads = [
            threading.Thread(target=self.client, args=(k, until, record))
            for k in range(self.clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    def measure(self) -> dict[str, float]:
        self.run(min(1.0, self.seconds / 5), record=False)  # warm-up: connections, caches
        elapsed = self.run(self.seconds, record=True)
        ms = sorted(x * 1000 for lat in self.latencies for x in lat)
        if not ms:
            return {"requests": 0, "rps": 0.0, "p50": float("nan"), "p99": float("nan")}
        return {
            "requests": len(ms),
            "rps": len(ms) / elapsed,
            "p50": statistics.median(ms),
            "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "max": ms[-1],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=10_000, help="nodes bound (10000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement (10)")
    parser.add_argument("--clients", default="1,8", help="client thread counts (1,8)")
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    bindings = max(1, args.bindings)
    root = Path(tempfile.mkdtemp(prefix="envfs-bench-api."))
    env = dict(
        os.environ,
        ENVFS_STORE=str(root / "store"),
        ENVFS_INDEX=str(root / "index"),
        UV_FIND_LINKS=str(root / "wheels"),
        UV_NO_INDEX="1",
        UV_OFFLINE="1",
    )
    proc: subprocess.Popen[bytes] | None = None
    rows: list[tuple[str, int, dict[str, float], int]] = []
    load_before = os.getloadavg()
    try:
        say(f"build one env, then bind {bindings} nodes to it in-process (Service.bind)")
        build_s, bind_s = make_store(root, env, bindings, args.python)
        say(f"built in {build_s:.1f} s; {bindings} bindings in {bind_s:.1f} s")
        print(
            f"setup: {bindings} bindings in {bind_s:.1f} s "
            f"({bind_s / bindings * 1000:.2f} ms each, Service.bind in-process); "
            f"the env's build {build_s:.1f} s",
            flush=True,
        )
        proc, port, log = start_server(root, env)
        say(f"serve-api pid {proc.pid} on port {port}")
        env_paths = ["/envs/{}/{}".format(*names(i)) for i in range(bindings)]
        for label, paths in (("GET /healthz", ["/healthz"]), ("GET /envs/{wf}/{node}", env_paths)):
            for n in clients:
                say(f"{label}, {n} client(s), {args.seconds:.0f} s")
                load = Load(port, paths, n, args.seconds)
                result = load.measure()
                rows.append((label, n, result, len(load.errors)))
                for error in load.errors[:3]:
                    say(f"  error: {error}")
        if "Traceback" in log.read_text():
            say(f"the server logged a traceback: see {log}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"benchmark stopped: {e}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    load_after = os.getloadavg()
    print()
    print(
        f"{'route':24s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'max ms':>7s} {'errors':>6s}"
    )
    for label, n, r, errors in rows:
        print(
            f"{label:24s} {n:7d} {r['rps']:8.0f} {r['p50']:7.2f} {r['p99']:7.2f} "
            f"{r.get('max', float('nan')):7.1f} {errors:6d}"
        )
    single = [r for label, n, r, _ in rows if label.startswith("GET /envs") and n == 1]
    if single:
        p99 = single[0]["p99"]
        verdict = "met" if p99 < TARGET_P99_MS else "MISSED"
        print(f"\nsingle-client GET /envs/{{wf}}/{{node}} p99 {p99:.2f} ms: "
              f"target < {TARGET_P99_MS:.0f} ms {verdict}")  # fmt: skip
    print(
        f"({bindings} bindings; {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; client and server share them)"
    )
    if args.json is not None:
        data = [{"route": lb, "clients": n, **r, "errors": e} for lb, n, r, e in rows]
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
