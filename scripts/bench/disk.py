"""Disk cost of many envs: 20 envs sharing most of a ~50 MB set of real PyPI packages.

Each env = a shared base (numpy and a small web stack) + one package of its own. Prints
`envfs du` / one env's size, and the bound it must stay under: 1.1 + the distinct
packages' share (bytes found in only one env / one env's size).
Usage: scripts/bench/disk [--envs N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BASE = [
    "numpy==2.1.3",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.10",
    "certifi==2024.8.30",
    "charset-normalizer==3.4.0",
    "six==1.16.0",
    "attrs==24.2.0",
    "packaging==24.2",
    "python-dateutil==2.9.0.post0",
]
OWN = [
    "toolz==1.0.0",
    "more-itertools==10.5.0",
    "tabulate==0.9.0",
    "wrapt==1.17.0",
    "decorator==5.1.1",
    "click==8.1.7",
    "colorama==0.4.6",
    "termcolor==2.5.0",
    "pyyaml==6.0.2",
    "markupsafe==3.0.2",
    "platformdirs==4.3.6",
    "filelock==3.16.1",
    "typing-extensions==4.12.2",
    "zipp==3.21.0",
    "tomli==2.2.1",
    "iniconfig==2.0.0",
    "pluggy==1.5.0",
    "pytz==2024.2",
    "cachetools==5.5.0",
    "tqdm==4.67.1",
]


def envfs(env: dict[str, str], *args: str) -> str:
    cmd = [sys.executable, "-m", "envfs", *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=20)
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--keep", type=Path, help="use (and keep) this store directory")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="envfs-bench-disk."))
    env = dict(os.environ, ENVFS_STORE=str(root / "store"), ENVFS_INDEX=str(root / "index"))
    t0 = time.monotonic()
    for i in range(args.envs):
        envfs(env, "build", f"bench/env{i:02d}", *BASE, OWN[i % len(OWN)], "--python", args.python)
        print(f"built env {i + 1}/{args.envs} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    du = json.loads(envfs(env, "du", "--json"))
    store = root / "store" / "snapshots"
    per_env: list[set[tuple[int, int]]] = []
    sizes: dict[tuple[int, int], int] = {}
    for sid in sorted(os.listdir(store)):
        inodes = set()
        for d, _, files in os.walk(store / sid):
            for f in files:
                st = os.lstat(os.path.join(d, f))
                inodes.add((st.st_dev, st.st_ino))
                sizes[(st.st_dev, st.st_ino)] = st.st_size
        per_env.append(inodes)
    counts = Counter(i for inodes in per_env for i in inodes)
    one_env = sum(p["apparent_bytes"] for p in du["per_snapshot"].values()) / len(per_env)
    distinct = sum(sizes[i] for i, c in counts.items() if c == 1)
    ratio = du["real_bytes"] / one_env
    share = distinct / one_env
    bound = 1.1 + share
    print(
        f"envs: {len(per_env)}; one env: {one_env / 2**20:.1f} MiB; "
        f"if copied: {du['apparent_bytes'] / 2**20:.0f} MiB; "
        f"envfs du: {du['real_bytes'] / 2**20:.1f} MiB"
    )
    print(f"distinct packages' share: {share:.3f}")
    print(
        f"du / one env = {ratio:.3f}  (bound 1.1 + {share:.3f} = {bound:.3f}): "
        f"{'OK' if ratio <= bound else 'OVER'}"
    )
    if args.keep is None:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    sys.exit(0 if ratio <= bound else 1)


if __name__ == "__main__":
    main()
