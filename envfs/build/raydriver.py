"""Envs for Ray workers: a worker started from an env's ``bin/python`` (Ray's
``runtime_env={"py_executable": ...}``) must import the driver's Ray version under the
driver's Python version, or the worker never registers and the task hangs. ``--ray-driver
PYTHON`` reads both from the driver's interpreter, adds ``ray==X`` to a spec and picks that
Python; ``envfs resolve --ray-driver PYTHON`` refuses an env that does not match."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from envfs.build.spec import project_name
from envfs.core.errors import BadInput

_PROBE = (
    "import json, sys\n"
    "try:\n    import ray\nexcept ImportError:\n    ray = None\n"
    "print(json.dumps([getattr(ray, '__version__', None), '%d.%d.%d' % sys.version_info[:3]]))"
)


@dataclass(frozen=True, slots=True)
class RayDriver:
    """The Ray and Python versions of a driver's interpreter."""

    python: str  # the interpreter's path, as given
    ray_version: str
    python_version: str  # "3.11.7"

    @property
    def requirement(self) -> str:
        return f"ray=={self.ray_version}"

    @property
    def minor(self) -> str:
        return ".".join(self.python_version.split(".")[:2])


def probe(python: str) -> RayDriver:
    """Ask ``python`` (the driver's interpreter) for its Ray and Python versions."""
    try:
        out = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BadInput(f"--ray-driver {python}: cannot run it: {exc}") from None
    try:
        ray_version, python_version = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"--ray-driver {python}: not a Python interpreter ({last})") from None
    if not ray_version:
        raise BadInput(f"--ray-driver {python}: that interpreter cannot import ray")
    return RayDriver(python, str(ray_version), str(python_version))


def add_to_requirements(reqs: list[str], driver: RayDriver) -> list[str]:
    """``reqs`` with the driver's ``ray==X`` (refusing another Ray requirement)."""
    for req in reqs:
        if project_name(req) == "ray" and req.replace(" ", "") != driver.requirement:
            raise BadInput(
                f"{req!r} conflicts with the Ray driver's {driver.requirement}; "
                "drop it, --ray-driver adds the right one"
            )
    return reqs if driver.requirement in reqs else [*reqs, driver.requirement]


def mismatch(packages: list[tuple[str, str]], python_version: str, driver: RayDriver) -> str | None:
    """Why an env with these packages and Python cannot run the driver's workers (None: it
    can)."""
    ray = dict(packages).get("ray")
    if ray is None:
        return f"has no ray; the driver runs ray {driver.ray_version} (bind with --ray-driver)"
    if ray != driver.ray_version:
        return (
            f"has ray {ray} but the driver runs ray {driver.ray_version}; workers would never "
            "start (rebind with --ray-driver)"
        )
    if python_version.split(".")[:2] != driver.python_version.split(".")[:2]:
        return (
            f"runs Python {python_version} but the driver runs {driver.python_version}; Ray "
            "needs one Python version (rebind with --ray-driver)"
        )
    return None
