"""Shared fixtures: a throwaway store and index per test, a local wheelhouse, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from envfs.store.files import remove_tree
from tests.wheels import make_wheelhouse

PY = "3.12"  # the interpreter tests build with (discovered, not downloaded)
ENVFS = [sys.executable, "-m", "envfs"]


#: A store holding only the captured test interpreter, made once per session (see `seeded`).
_TEMPLATE: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def captured_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Capture the test interpreter once; `make_env` stores start with it (hardlinked).

    Capturing takes seconds; most tests are about envs, not about capture, so their stores
    begin as a store would after its first `envfs python add`.  Tests of capture itself
    use ``make_env(..., seed=False)``.
    """
    root = tmp_path_factory.mktemp("python-template")
    env = make_env(root, None, seed=False)
    env.run("python", "add", PY)
    _TEMPLATE.append(env.store)
    yield env.store
    _TEMPLATE.clear()
    remove_tree(root)


def seed_store(store: Path) -> None:
    """Give a new store the session's captured interpreter (its tree and pool, hardlinked)."""
    template = _TEMPLATE[0]
    store.mkdir(parents=True, exist_ok=True)
    for sub in ("interpreters", "objects"):
        subprocess.run(["cp", "-al", str(template / sub), str(store / sub)], check=True)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@dataclass
class Env:
    """A throwaway store + index, and the environment the CLI runs in."""

    root: Path
    store: Path
    index: Path
    vars: dict[str, str]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*ENVFS, *args], capture_output=True, text=True, env=self.vars, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"envfs {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*ENVFS, *args],
            env=self.vars,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kw,
        )

    def show(self, target: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("show", target, "--json").stdout)
        return data

    def audit(self) -> list[dict[str, Any]]:
        """Every event of every host's log (``log/*.jsonl``), in time order."""
        from envfs.store.feed import all_events

        return [e.model_dump() for e in all_events(self.store / "log")]

    def built_events(self, snapshot_id: str) -> int:
        return sum(
            1 for e in self.audit() if e["event"] == "built" and e["snapshot_id"] == snapshot_id
        )

    def listing(self, sub: str) -> set[str]:
        d = self.store / sub
        return set(os.listdir(d)) if d.exists() else set()


def make_env(root: Path, wheelhouse: Path | None, host: str = "node-a", seed: bool = True) -> Env:
    root.mkdir(parents=True, exist_ok=True)
    if seed and _TEMPLATE and not (root / "store").exists():
        seed_store(root / "store")
    variables = dict(os.environ)
    variables.update(
        ENVFS_STORE=str(root / "store"),
        ENVFS_INDEX=str(root / "index"),
        ENVFS_HOST=host,
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    if wheelhouse is not None:
        variables.update(UV_FIND_LINKS=str(wheelhouse), UV_NO_INDEX="1", UV_OFFLINE="1")
    return Env(root, root / "store", root / "index", variables)


@pytest.fixture
def local(tmp_path: Path, wheelhouse: Path) -> Iterator[Env]:
    """A store whose builds use only the local wheelhouse (no network)."""
    env = make_env(tmp_path / "local", wheelhouse)
    yield env
    remove_tree(env.root)


@pytest.fixture
def pypi(tmp_path: Path) -> Iterator[Env]:
    """A store whose builds use the real package index."""
    env = make_env(tmp_path / "pypi", None)
    yield env
    remove_tree(env.root)


@contextlib.contextmanager
def reachable_by_all(path: Path) -> Iterator[None]:
    """Let every user (``nobody`` in a test) reach ``path``, as on a node: its parents up to
    /tmp get o+rx for the context, and their modes back after it."""
    opened = {}
    for parent in path.parents:
        if parent in (Path("/tmp"), Path("/")):
            break
        opened[parent] = os.stat(parent).st_mode & 0o7777
        os.chmod(parent, opened[parent] | 0o755)
    try:
        yield
    finally:
        for parent, mode in opened.items():
            os.chmod(parent, mode)


@contextlib.contextmanager
def served_index(simple: Path, ready_path: str) -> Iterator[str]:
    """The PEP 503 tree ``simple`` served by a real ``python -m http.server`` on a free
    loopback port, once ``<url>/<ready_path>`` answers; its URL. Stopped after."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=simple.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/{simple.name}"
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["curl", "-sf", f"{url}/{ready_path}"], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline, "the local index did not start"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
