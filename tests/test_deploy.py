"""docs/deploy: every file parses, and every envfs command and option it names exists."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from envfs.cli import main

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def _check_calls(text: str, where: str) -> int:
    """Each call of the envfs executable (``.../bin/envfs SUBCOMMAND args``, in a unit, a
    manifest's command list or a script) names a real subcommand and only options it has;
    how many calls."""
    calls = 0
    for line in text.splitlines():
        if "bin/envfs" not in line or line.lstrip().startswith("#"):
            continue
        rest = line.split("bin/envfs", 1)[1]
        tokens = [t for t in re.split(r"[\s,\[\]\")']+", rest) if t]
        sub = tokens[0]
        assert sub in main.commands, f"{where}: `envfs {sub}` is not a command"
        known = _options(main.commands[sub])
        for token in tokens[1:]:
            if token.startswith("--"):
                assert token in known, f"{where}: `envfs {sub}` has no option {token}"
        calls += 1
    return calls


def _unit(unit: Path) -> configparser.ConfigParser:
    """A systemd unit file, parsed (keys keep their case)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser


def test_the_systemd_unit() -> None:
    unit = DEPLOY / "envfs.service"
    parser = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    assert "mount /envs --foreground" in service["ExecStart"]
    assert "umount /envs" in service["ExecStop"] and service["KillSignal"] == "SIGTERM"
    assert _check_calls(unit.read_text(), unit.name) == 3


def test_the_api_unit() -> None:
    unit = DEPLOY / "envfs-api.service"
    service = _unit(unit)["Service"]
    assert "serve-api" in service["ExecStart"] and "--token-file" in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"  # serve-api exits 0 on it, after its builds
    assert _check_calls(unit.read_text(), unit.name) == 1


def _manifests(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert docs, name
    return docs


def test_the_daemonset_mounts_envs_with_bidirectional_propagation() -> None:
    (ds,) = _manifests("daemonset.yaml")
    assert ds["kind"] == "DaemonSet" and ds["apiVersion"] == "apps/v1"
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/envs"]["mountPropagation"] == "Bidirectional"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"]["type"] == "CharDevice"
    assert ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]
    text = (DEPLOY / "daemonset.yaml").read_text()
    assert _check_calls(text, "daemonset.yaml") == 2


def test_the_job_uses_envs_read_only_from_the_host() -> None:
    (job,) = _manifests("job.yaml")
    assert job["kind"] == "Job"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/envs" and mount["readOnly"] is True
    assert mount["mountPropagation"] == "HostToContainer"
    assert re.fullmatch(r"/envs/[^/]+/[^/]+/bin/python", container["command"][0])


@pytest.mark.parametrize("script", ["docker-run.sh", "slurm-job.sh"])
def test_the_scripts_parse_and_name_real_commands(script: str) -> None:
    path = DEPLOY / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    _check_calls(text, script)
    if script == "docker-run.sh":
        assert "-v /envs:/envs:ro,rslave" in text and "/envs/etl/prep/bin/python" in text
    else:
        assert _check_calls(text, script) == 1 and "#SBATCH" in text


def _service(name: str) -> dict[str, str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / name)
    return dict(unit["Service"])


#: Options that give a service its own mount namespace (or limit its devices): the
#: daemon's FUSE mount and bind mounts would then be invisible to the node's processes.
_PRIVATE_MOUNTS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "PrivateMounts", "MountFlags", "DeviceAllow",
    "ProtectClock", "RootDirectory",
)  # fmt: skip


def test_the_daemon_unit_stays_in_the_hosts_mount_namespace_and_the_api_is_confined() -> None:
    daemon, api = _service("envfs.service"), _service("envfs-api.service")
    assert not set(_PRIVATE_MOUNTS) & set(daemon), set(_PRIVATE_MOUNTS) & set(daemon)
    assert daemon["NoNewPrivileges"] == api["NoNewPrivileges"] == "yes"
    assert api["ProtectSystem"] == "strict" and api["PrivateTmp"] == "yes"
    caps = set(api["CapabilityBoundingSet"].split())
    assert {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"} <= caps  # the build sandbox
    assert "CAP_NET_ADMIN" not in caps and "CAP_SYS_PTRACE" not in caps
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze to score the unit")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(DEPLOY / "envfs-api.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert score is not None and float(score[1]) <= 4.0, out.stdout[-300:]
