"""Two tasks of one Ray job, each in its own envfs env, with conflicting versions of a package.

Each task's workers start from the env's interpreter under the mount (Ray's
``runtime_env={"py_executable": ...}``), so nothing is installed per task. A worker must
import the driver's Ray under the driver's Python: bind the envs with ``--ray-driver``,
which adds the driver's ``ray==X`` and picks its Python, and resolve them with it too,
which refuses an env that does not match (instead of a task that hangs):

    envfs build demo/old 'six==1.15.0' --ray-driver "$(command -v python)"
    envfs build demo/new 'six==1.16.0' --ray-driver "$(command -v python)"
    python docs/examples/ray_two_envs.py demo/old demo/new     # the same python, mount up

It prints one JSON line: for each env, the six version its task saw and its interpreter.
``ENVFS_CLI`` overrides how the envfs CLI is run (default: ``envfs`` on PATH).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import ray


def env_python(target: str) -> str:
    """The pinned interpreter of ``target`` under the mount, checked against this driver."""
    cli = shlex.split(os.environ.get("ENVFS_CLI", "envfs"))
    done = subprocess.run(
        [*cli, "resolve", target, "--ray-driver", sys.executable],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(done.stderr.strip() or f"envfs resolve {target} failed")
    return done.stdout.strip() + "/bin/python"


def which_six() -> dict[str, str]:
    import six

    return {"six": six.__version__, "python": sys.executable}


def main(targets: list[str]) -> None:
    pythons = {t: env_python(t) for t in targets}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tasks = {
            t: ray.remote(runtime_env={"py_executable": p})(which_six).remote()
            for t, p in pythons.items()
        }
        print(json.dumps({t: ray.get(ref, timeout=300) for t, ref in tasks.items()}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
