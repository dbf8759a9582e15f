"""Shared fixtures: a throwaway store and index per test, a local wheelhouse, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from envfs.store import remove_tree
from tests.wheels import make_wheelhouse

PY = "3.12"  # the interpreter tests build with (discovered, not downloaded)
ENVFS = [sys.executable, "-m", "envfs"]


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
        path = self.store / "log" / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def built_events(self, snapshot_id: str) -> int:
        return sum(
            1 for e in self.audit() if e["event"] == "built" and e["snapshot_id"] == snapshot_id
        )

    def listing(self, sub: str) -> set[str]:
        d = self.store / sub
        return set(os.listdir(d)) if d.exists() else set()


def make_env(root: Path, wheelhouse: Path | None, host: str = "node-a") -> Env:
    root.mkdir(parents=True, exist_ok=True)
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
