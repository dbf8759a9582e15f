"""Ray on a local cluster: two tasks of one job in two envs with conflicting versions of one
package, each seeing its own (docs/examples/ray_two_envs.py, run as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.test_e2e import Mount

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]
EXAMPLE = Path(__file__).resolve().parent.parent / "docs/examples/ray_two_envs.py"
DRIVER = sys.executable  # the test venv's Python, which has Ray


@pytest.fixture
def mounted(pypi: Env, tmp_path: Path) -> Iterator[tuple[Env, Path]]:
    pypi.vars["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    pypi.vars["RAY_AUTH_MODE"] = "disabled"
    pypi.run("python", "add", DRIVER)  # makes the store: the envs run the driver's Python
    mount = Mount(pypi, tmp_path / "envs")
    try:
        yield pypi, mount.path
    finally:
        mount.stop()
        mount.check_clean_exit()


def test_two_ray_tasks_in_two_envs_each_see_their_own_package(
    mounted: tuple[Env, Path],
) -> None:
    env, mnt = mounted
    import ray

    for node, six in (("old", "1.15.0"), ("new", "1.16.0")):
        env.run("build", f"ray/{node}", f"six=={six}", "--ray-driver", DRIVER, timeout=900)
        shown = env.run("show", f"ray/{node}", "--packages").stdout
        assert f"ray=={ray.__version__}" in shown  # the driver's Ray, added by --ray-driver
        assert f"python: {'.'.join(map(str, sys.version_info[:3]))}" in shown
    cli = f"{sys.executable} -m envfs"
    run = subprocess.run(
        [DRIVER, str(EXAMPLE), "ray/old", "ray/new"],
        env=dict(env.vars, ENVFS_CLI=cli),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["ray/old"] == {"six": "1.15.0", "python": str(mnt / "ray/old@1/bin/python")}
    assert seen["ray/new"] == {"six": "1.16.0", "python": str(mnt / "ray/new@1/bin/python")}


def test_an_env_without_the_drivers_ray_is_refused_in_one_line(local: Env) -> None:
    local.vars["XDG_RUNTIME_DIR"] = str(local.root / "run")
    local.run("bind", "ray/plain", "extra-a==1.0", "--python", "3.11")
    out = local.run("resolve", "ray/plain", "--ray-driver", DRIVER, check=False)
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        "envfs: error: ray/plain@1 has no ray; the driver runs ray "
        f"{__import__('ray').__version__} (bind with --ray-driver)"
    ]
    # a --python other than the driver's is refused at bind time, before anything is written
    wrong = local.run(
        "bind", "ray/x", "six", "--ray-driver", DRIVER, "--python", "3.12", check=False
    )
    assert wrong.returncode == 3 and "Ray needs one Python version" in wrong.stderr
    assert local.run("show", "ray/x", check=False).returncode != 0
    # not a Ray driver at all
    bad = local.run("bind", "ray/x", "six", "--ray-driver", "/bin/true", check=False)
    assert bad.returncode == 3 and "not a Python interpreter" in bad.stderr


def test_ray_driver_with_a_project_checks_its_locked_ray(local: Env, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.11"\n'
        'dependencies = ["extra-a==1.0"]\n[tool.uv]\npackage = false\n'
    )
    subprocess.run(
        ["uv", "lock", "-q", "--project", str(project), "--python", DRIVER],
        env=local.vars,
        check=True,
    )
    out = local.run("bind", "ray/p", "--project", str(project), "--ray-driver", DRIVER, check=False)
    assert out.returncode == 3 and "locks ray (none)" in out.stderr
