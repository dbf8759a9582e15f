"""Helpers for real-mount tests: a JSON-backed fake Catalog, a daemon runner, snapshot fixtures.

The daemon runs in a subprocess (``python -m tests.fusehelpers STATE MOUNTPOINT``) so that
SIGTERM and SIGKILL are real.  The test changes what the catalog says by rewriting the state
file; ``refresh()`` rereads it.  State file keys:

    bindings        {wf: {node: [snapshot id of revision 1, 2, ...]}}  (in the index)
    store_bindings  same shape: only in the "store" (found by lookup_store)
    snapshots       {id: dir} built snapshots
    buildable       {id: {"dir": d, "sleep": s, "fail": n}}: build() sleeps s seconds, fails
                    the first n attempts, then publishes d
    log             file where build/lookup_store calls are appended, one line each
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from envfs.build.tree import scan_tree
from envfs.core.errors import BuildFailed, NotFound
from envfs.core.views import BindingView

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 15.0


class JsonCatalog:
    """A Catalog whose index is a JSON file the test rewrites."""

    def __init__(self, state_path: Path) -> None:
        self._path = state_path
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._found: dict[str, dict[str, list[str]]] = {}  # bindings lookup_store pulled in
        self._published: dict[str, str] = {}
        self._load()
        self._current = self._currents()

    def _load(self) -> None:
        with self._lock:
            self._state = json.loads(self._path.read_text())

    def _log(self, line: str) -> None:
        with open(self._state["log"], "a") as f:
            f.write(line + "\n")

    def _bindings(self) -> dict[str, dict[str, list[str]]]:
        merged: dict[str, dict[str, list[str]]] = {
            wf: dict(nodes) for wf, nodes in self._found.items()
        }
        for wf, nodes in self._state.get("bindings", {}).items():
            merged.setdefault(wf, {}).update(nodes)
        return merged

    def _currents(self) -> dict[tuple[str, str], str]:
        return {
            (wf, node): revs[-1]
            for wf, nodes in self._bindings().items()
            for node, revs in nodes.items()
        }

    def workflows(self) -> list[str]:
        return sorted(wf for wf, nodes in self._bindings().items() if nodes)

    def workflow_grant(self, workflow: str) -> tuple[int, int] | None:
        return None

    def snapshot_grant(self, snapshot_id: str) -> tuple[int, int] | None:
        return None

    def grants_generation(self) -> int:
        return 0

    def nodes(self, workflow: str) -> list[str]:
        return sorted(self._bindings().get(workflow, {}))

    def current(self, workflow: str, node: str) -> BindingView | None:
        revs = self._bindings().get(workflow, {}).get(node)
        if not revs:
            return None
        return BindingView(workflow, node, len(revs), revs[-1])

    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        revs = self._bindings().get(workflow, {}).get(node)
        if not revs or not 1 <= revision <= len(revs):
            return None
        return BindingView(workflow, node, revision, revs[revision - 1])

    def snapshot_dir(self, snapshot_id: str) -> Path | None:
        found = self._published.get(snapshot_id) or self._state.get("snapshots", {}).get(
            snapshot_id
        )
        return None if found is None else Path(found)

    def workflow_in_store(self, workflow: str) -> bool:
        self._log(f"workflow_in_store {workflow}")
        return bool(self._state.get("store_bindings", {}).get(workflow))

    def find_snapshot(self, prefix: str) -> str | None:
        built = {**self._state.get("snapshots", {}), **self._published}
        found = [sid for sid in built if sid.startswith(prefix)]
        return found[0] if len(found) == 1 else None

    def lookup_store(self, workflow: str, node: str) -> BindingView | None:
        self._log(f"lookup_store {workflow}/{node}")
        revs = self._state.get("store_bindings", {}).get(workflow, {}).get(node)
        if not revs:
            return None
        self._found.setdefault(workflow, {})[node] = list(revs)
        return self.current(workflow, node)

    def build(self, snapshot_id: str) -> Path:
        spec = self._state.get("buildable", {}).get(snapshot_id)
        self._log(f"build {snapshot_id}")
        if spec is None:
            raise NotFound(f"no spec for snapshot {snapshot_id}")
        time.sleep(float(spec.get("sleep", 0)))
        attempts = sum(
            1
            for line in Path(self._state["log"]).read_text().splitlines()
            if line == f"build {snapshot_id}"
        )
        if attempts <= int(spec.get("fail", 0)):
            raise BuildFailed(f"fake build of {snapshot_id} failed on purpose (attempt {attempts})")
        self._published[snapshot_id] = spec["dir"]
        return Path(spec["dir"])

    def hold(self, snapshot_ids: list[str]) -> None:
        pass  # no store: nothing to collect

    def release(self, snapshot_ids: list[str]) -> None:
        pass

    def refresh(self) -> list[tuple[str, str]]:
        self._load()
        current = self._currents()
        changed = [
            key
            for key in current.keys() | self._current.keys()
            if current.get(key) != self._current.get(key)
        ]
        self._current = current
        return sorted(changed)


# -- snapshots on disk ----------------------------------------------------------------------

PROBE_SCRIPT = """#!/bin/sh
'''exec' "$(dirname -- "$0")/python" "$0" "$@"
' '''
import sys
import shared_mod
print(shared_mod.hello(), sys.prefix)
"""


def make_venv(root: Path) -> Path:
    """A real venv (no pip) with a module in site-packages and a relocatable console script."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    (site / "shared_mod.py").write_text("def hello() -> str:\n    return 'hello from shared_mod'\n")
    script = root / "bin" / "envfs-probe"
    script.write_text(PROBE_SCRIPT)
    script.chmod(0o755)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))  # many reads, larger than one request
    return root


def make_snapshot(store: Path, snapshot_id: str, base: Path, marker: str) -> Path:
    """A snapshot dir: ``base`` hardlinked (shared inodes), a ``marker.txt``, ``.envfs/``."""
    target = store / "snapshots" / snapshot_id
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, target, symlinks=True, copy_function=os.link)
    (target / "marker.txt").write_text(marker + "\n")
    write_manifest(target)
    (target / ".envfs" / "build.log").write_text("built\n")
    return target


def write_manifest(snapshot: Path) -> None:
    """The part of a build's manifest the filesystem serves from: every entry of the tree."""
    entries, _ = scan_tree(snapshot, forbidden=[])
    meta = snapshot / ".envfs"
    meta.mkdir(exist_ok=True)
    files = [e.model_dump() for e in entries]
    (meta / "manifest.json").write_text(json.dumps({"files": files}))


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


# -- daemon processes -----------------------------------------------------------------------


def stat_errno(path: Path, timeout: float = 5.0) -> int:
    """errno of ``stat(path)`` in a child process (0 if it works), so a hung mount can't hang us."""
    code = (
        "import os, sys\n"
        "try:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n"
        "else:\n    print(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return int(out.stdout.strip())


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


def stop_daemon(proc: subprocess.Popen[Any], mountpoint: Path, grace: float = 15) -> None:
    """SIGTERM a daemon (SIGKILL if it lingers past ``grace``), then lazily unmount."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    force_unmount(mountpoint)


class DaemonProcess:
    """``run_daemon`` in a subprocess; always stopped and unmounted by `stop`."""

    def __init__(
        self,
        state: Path,
        mountpoint: Path,
        status: Path,
        *,
        retry_after: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.status = status
        self.stderr_path = mountpoint.parent / f"daemon-{time.monotonic_ns()}.log"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fusehelpers",
                    str(state),
                    str(mountpoint),
                    "--status",
                    str(status),
                    "--retry-after",
                    str(retry_after),
                ],
                cwd=REPO,
                stderr=err,
                env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _status_pid(self) -> int | None:
        try:
            pid = json.loads(self.status.read_text())["pid"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
        return int(pid)

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if is_mounted(self.mountpoint) and self._status_pid() == self.proc.pid:
                return
            time.sleep(0.05)
        raise AssertionError(f"mount did not appear within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        stop_daemon(self.proc, self.mountpoint)


# -- the runner -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="run envfs over a JSON fake catalog")
    parser.add_argument("state", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--status", type=Path)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--refresh", type=float, default=0.2)
    parser.add_argument("--detach", action="store_true", help="return once mounted")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from envfs.fs.mount import run_daemon

    with contextlib.suppress(KeyboardInterrupt):
        run_daemon(
            JsonCatalog(args.state),
            args.mountpoint,
            allow_other=False,
            foreground=not args.detach,
            status_path=args.status,
            refresh_interval=args.refresh,
            build_retry_after=args.retry_after,
            kernel_mounts=False,  # these test FUSE serving; tests/fs/test_kernel.py the kernel's
        )


if __name__ == "__main__":
    main()
