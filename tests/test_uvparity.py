"""uv parity: private indexes (credentials never stored), project extras/groups/dev, and
the project itself installed non-editable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, Env
from tests.index_server import private_index


def _py() -> str:
    """The path of the tests' Python (uv alone cannot find pyenv's 3.12 here)."""
    from envfs.build import interpreters

    return interpreters.find(PY).path


def _online(env: Env) -> dict[str, str]:
    """The env's variables without the local wheelhouse's offline settings."""
    for var in ("UV_FIND_LINKS", "UV_NO_INDEX", "UV_OFFLINE"):
        env.vars.pop(var, None)
    return env.vars


def _everything_in(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_private_index_credentials_are_used_but_never_stored(
    local: Env, wheelhouse: Path, tmp_path: Path
) -> None:
    default = local.run("build", "wf/pub", "extra-a==1.0", "--python", PY, "--json")
    public_id = json.loads(default.stdout)["snapshot_id"]
    _online(local)
    with private_index(wheelhouse) as index:
        # no credentials: one line saying how to give them, nothing bound
        denied = local.run("build", "wf/a", "extra-a==1.0", "--python", PY, "--index-url",
                           index.url, check=False)  # fmt: skip
        assert denied.returncode != 0
        assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr
        assert "refused access" in denied.stderr and "netrc" in denied.stderr
        assert local.run("show", "wf/a", check=False).returncode != 0
        # credentials in the URL: used, never written
        built = local.run("build", "wf/a", "extra-a==1.0", "--python", PY, "--index-url",
                          index.url_with_credentials, "--json")  # fmt: skip
        sid = json.loads(built.stdout)["snapshot_id"]
        assert sid != public_id  # the index is part of the id
        assert index.served("/files/extra_a-1.0")
        blob = _everything_in(local.store) + _everything_in(local.index)
        assert index.password.encode() not in blob
        assert index.url.encode() in (local.store / f"specs/{sid}/pyproject.toml").read_bytes()
        assert local.show("wf/a")["index_url"] == index.url
        # UV_INDEX_URL is the same as --index-url; credentials from ~/.netrc
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1\nlogin {index.user}\npassword {index.password}\n")
        local.vars.update(UV_INDEX_URL=index.url, NETRC=str(netrc))
        via_netrc = local.run("build", "wf/c", "extra-b==2.0", "--python", PY, "--json")
        assert index.served("/files/extra_b-2.0")
        assert local.show("wf/c")["index_url"] == index.url
        assert json.loads(via_netrc.stdout)["state"] == "ready"


def test_private_index_is_refused_for_projects_and_so_are_stored_credentials(
    local: Env, tmp_path: Path
) -> None:
    project = _project(tmp_path, local)
    given = local.run("bind", "wf/p", "--project", str(project), "--index-url",
                      "https://example.invalid/simple", check=False)  # fmt: skip
    assert given.returncode == 3 and "[[tool.uv.index]]" in given.stderr
    # an index variable in the environment applies to requirement lists only
    local.vars["UV_INDEX_URL"] = "https://example.invalid/simple"
    local.run("bind", "wf/p", "--project", str(project))
    text = (project / "pyproject.toml").read_text()
    (project / "pyproject.toml").write_text(
        text + '\n[[tool.uv.index]]\nname = "corp"\nurl = "https://u:pw@example.invalid/simple"\n'
    )
    stored = local.run("bind", "wf/q", "--project", str(project), check=False)
    assert stored.returncode == 3 and "has credentials in it" in stored.stderr
    assert "pw" not in stored.stderr
    bad = local.run("bind", "wf/r", "six", "--index-url", "ftp://x/simple", check=False)
    assert bad.returncode == 3 and "not an http(s) URL" in bad.stderr


def _project(tmp_path: Path, env: Env, package: bool = False) -> Path:
    """A uv project: extra-a, an extra `b` (extra-b), a dev group (tool-pkg), a group `slow`."""
    project = tmp_path / "proj"
    (project / "src/demo_app").mkdir(parents=True)
    (project / "src/demo_app/__init__.py").write_text("def main() -> None:\n    print('v1')\n")
    build = (
        '[project.scripts]\ndemo-app = "demo_app:main"\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        if package
        else "[tool.uv]\npackage = false\n"
    )
    (project / "pyproject.toml").write_text(
        '[project]\nname = "demo-app"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["extra-a==1.0"]\n'
        '[project.optional-dependencies]\nb = ["extra-b==2.0"]\n'
        '[dependency-groups]\ndev = ["tool-pkg==0.1"]\nslow = ["slow-pkg==1.0"]\n' + build
    )
    subprocess.run(["uv", "lock", "-q", "--project", str(project), "--python", _py()],
                   env=env.vars, check=True)  # fmt: skip
    return project


def _installed(env: Env, target: str) -> set[str]:
    data = json.loads(env.run("show", target, "--packages", "--json").stdout)
    return {p["name"] for p in data["packages"]}


def test_project_extras_groups_and_dev(local: Env, tmp_path: Path) -> None:
    project = _project(tmp_path, local)
    local.run("build", "wf/default", "--project", str(project), "--python", PY)
    assert _installed(local, "wf/default") == {"extra-a", "base-lib", "tool-pkg"}  # uv's default
    local.run("build", "wf/chosen", "--project", str(project), "--python", PY,
              "--no-dev", "--extra", "b", "--group", "slow")  # fmt: skip
    assert _installed(local, "wf/chosen") == {"extra-a", "base-lib", "extra-b", "slow-pkg"}
    default, chosen = local.show("wf/default"), local.show("wf/chosen")
    assert default["snapshot_id"] != chosen["snapshot_id"]
    assert default["selection"] is None
    assert chosen["selection"] == "--extra b --group slow --no-dev"
    for args, message in (
        (["--extra", "nope"], "has no extra 'nope' (its extras: b)"),
        (["--group", "nope"], "has no dependency group 'nope' (its groups: dev, slow)"),
    ):
        out = local.run("bind", "wf/x", "--project", str(project), *args, check=False)
        assert out.returncode == 3 and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    alone = local.run("bind", "wf/x", "six", "--no-dev", check=False)
    assert alone.returncode == 3 and "need --project" in alone.stderr
    assert local.run("show", "wf/x", check=False).returncode != 0


@pytest.mark.network
def test_install_project_is_not_editable(pypi: Env, tmp_path: Path) -> None:
    """The project itself goes in as a wheel built at bind time (hatchling from PyPI)."""
    project = tmp_path / "proj"
    (project / "src/demo_app").mkdir(parents=True)
    (project / "src/demo_app/__init__.py").write_text("def main() -> None:\n    print('v1')\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "demo-app"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["six==1.16.0"]\n[project.scripts]\ndemo-app = "demo_app:main"\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    subprocess.run(["uv", "lock", "-q", "--project", str(project), "--python", _py()],
                   env=pypi.vars, check=True)  # fmt: skip
    pypi.run("build", "wf/app", "--project", str(project), "--python", PY, "--install-project")
    info = pypi.show("wf/app")
    assert info["selection"] == "--install-project"
    assert {"demo-app", "six"} <= _installed(pypi, "wf/app")
    script = Path(info["snapshot_path"]) / "bin/demo-app"
    (project / "src/demo_app/__init__.py").write_text("def main() -> None:\n    print('v2')\n")
    ran = subprocess.run([script], capture_output=True, text=True, check=True)
    assert ran.stdout == "v1\n"  # the env has its own copy, not the project's tree
    without = pypi.run("build", "wf/deps", "--project", str(project), "--python", PY, "--json")
    assert json.loads(without.stdout)["snapshot_id"] != info["snapshot_id"]
    assert "demo-app" not in _installed(pypi, "wf/deps")


def test_install_project_builds_the_project_unprivileged(pypi: Env, tmp_path: Path) -> None:
    """The project's build backend is package code too: it runs in the build sandbox (as
    root here, it ran as the build user and could not write the store)."""
    project = tmp_path / "proj"
    (project / "probe_app").mkdir(parents=True)
    (project / "setup.py").write_text(
        "import os, pathlib\n"
        "r = {'uid': os.getuid()}\n"
        "try:\n"
        f"    pathlib.Path({str(pypi.store)!r}, 'pwned').write_text('x'); r['store'] = 'done'\n"
        "except OSError as e:\n"
        "    r['store'] = type(e).__name__\n"
        "pathlib.Path('probe_app/report.py').write_text(f'REPORT = {r!r}\\n')\n"
        "from setuptools import setup\nsetup()\n"
    )
    (project / "probe_app/__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "probe-app"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = []\n[tool.setuptools]\npackages = ["probe_app"]\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    subprocess.run(["uv", "lock", "-q", "--project", str(project), "--python", _py()],
                   env=pypi.vars, check=True)  # fmt: skip
    (pypi.store / "pwned").unlink(missing_ok=True)  # the test's own uv lock ran setup.py
    pypi.run("build", "wf/probe", "--project", str(project), "--python", PY, "--install-project")
    snap = Path(pypi.show("wf/probe")["snapshot_path"])
    out = subprocess.run([str(snap / "bin/python"), "-c",
                          "from probe_app.report import REPORT; print(REPORT)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    report = eval(out.stdout)
    if os.geteuid() == 0:
        assert report["uid"] != 0 and report["store"] == "PermissionError", report
    assert not (pypi.store / "pwned").exists()
