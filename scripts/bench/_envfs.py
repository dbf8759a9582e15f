"""What the benchmarks share: a throwaway store, the envfs CLI, and a mounted daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class EnvfsHarness:
    """A store under ``root``, the CLI over it, and one `envfs mount --foreground` at
    ``root/mnt``; ``run_env`` is what timed interpreters see (nothing of this venv)."""

    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.python = python
        self.mnt = root / "mnt"
        self.env = dict(
            os.environ,
            ENVFS_STORE=str(root / "store"),
            ENVFS_INDEX=str(root / "index"),
            XDG_RUNTIME_DIR=str(root / "run"),
        )
        self.run_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.run_env.pop("VIRTUAL_ENV", None)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"
        self.mount_args: list[str] = []  # more options for `envfs mount`

    def cli(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "envfs", *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"envfs {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def mount(self, ready: Callable[[], bool] = lambda: True) -> None:
        """Start the daemon; return once the mount is up and ``ready()`` holds (30 s)."""
        self.mnt.mkdir(exist_ok=True)
        with open(self.log, "ab") as out:
            self.daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "envfs",
                    "mount",
                    str(self.mnt),
                    "--foreground",
                    *self.mount_args,
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.daemon.returncode}); see {self.log}")
            try:
                if os.path.ismount(self.mnt) and ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.mnt} not ready after 30 s; see {self.log}")

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(
                [sys.executable, "-m", "envfs", "umount", str(self.mnt)],
                env=self.env,
                capture_output=True,
                check=False,
                timeout=60,
            )
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if self.daemon is not None:
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.terminate()
                try:
                    self.daemon.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait()
            self.daemon = None
