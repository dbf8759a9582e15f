"""Environments that travel: bundles exported the same every time and imported into
another store with no network (checked whole, refused in one line when damaged, nothing
left), content shared between bundles stored once; templates (real CLI, real stores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENVFS, PY, Env, make_env
from tests.test_e2e import Mount, fs  # noqa: F401  (fixture)


def _sid(env: Env, target: str) -> str:
    return str(env.show(target)["snapshot_id"])


def _entries(store: Path) -> list[str]:
    return sorted(
        f"{d}/{n}"
        for d in ("snapshots", "staging", "bindings", "specs")
        if (store / d).is_dir()
        for n in os.listdir(store / d)
    )


def _offline(env: Env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI in a network namespace with no network at all (`unshare -n`)."""
    proc = subprocess.run(
        ["unshare", "-n", *ENVFS, *args], capture_output=True, text=True, env=env.vars, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"envfs {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_a_bundle_is_the_same_bytes_twice_and_imports_offline_as_the_same_env(
    local: Env, tmp_path: Path, wheelhouse: Path
) -> None:
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/u", "extra-a==1.0", "extra-b==2.0", "--python", PY)
    sid, other = _sid(local, "wf/t"), _sid(local, "wf/u")
    one, two = tmp_path / "one.envfs", tmp_path / "two.envfs"
    local.run("export", "wf/t@1", "-o", str(one))
    local.run("export", "wf/t", "-o", str(two))
    assert one.read_bytes() == two.read_bytes()
    listing = subprocess.run(
        f"zstd -d -q -c {one} | tar -t", shell=True, capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[:2] == ["envfs-bundle.json", "sbom.cdx.json"]
    elsewhere = make_env(tmp_path / "elsewhere", None, host="site-b", seed=False)
    out = _offline(elsewhere, "import", str(one), "--bind", "x/y", "--json").stdout
    report = json.loads(out)
    assert report["snapshot_id"] == sid and report["binding"] == "x/y"
    assert set(report["added"]) == {"interpreter", "spec", "snapshot"}
    assert _sid(elsewhere, "x/y") == sid
    assert elsewhere.run("verify").returncode == 0
    site = "lib/python3.12/site-packages"
    here, there = (e.store / "snapshots" / sid for e in (local, elsewhere))
    for rel in (f"{site}/extra_a/__init__.py", "bin/python3.12"):
        assert (here / rel).read_bytes() == (there / rel).read_bytes()
    run = subprocess.run(
        [str(there / "bin/python"), "-c", "import extra_a, sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.strip() == str(there)
    # a second bundle sharing extra-a: its files are linked to what the store has
    third = tmp_path / "u.envfs"
    local.run("export", "wf/u", "-o", str(third))
    report = json.loads(_offline(elsewhere, "import", str(third), "--json").stdout)
    assert report["added"] == ["spec", "snapshot"]
    shared = f"{site}/extra_a/__init__.py"
    a, b = there / shared, elsewhere.store / "snapshots" / other / shared
    assert os.stat(a).st_ino == os.stat(b).st_ino
    # again: nothing new
    report = json.loads(_offline(elsewhere, "import", str(one), "--json").stdout)
    assert report["added"] == []


def test_a_damaged_or_foreign_bundle_is_refused_in_one_line_and_leaves_nothing(
    local: Env, tmp_path: Path
) -> None:
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    good = tmp_path / "good.envfs"
    local.run("export", "wf/t", "-o", str(good))
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped = tmp_path / "flipped.envfs"
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.envfs"
    truncated.write_bytes(bytes(good.read_bytes()[: len(data) // 3]))
    junk = tmp_path / "junk.envfs"
    junk.write_bytes(b"not a bundle at all\n" * 100)
    target = make_env(tmp_path / "target", None, host="t", seed=False)
    for bad in (flipped, truncated, junk, tmp_path / "missing.envfs"):
        proc = target.run("import", str(bad), "--bind", "x/z", check=False)
        assert proc.returncode == 3, (bad.name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert _entries(target.store) == [], bad.name
    proc = target.run("export", "wf/t", check=False)
    assert proc.returncode == 3 and "give one of -o FILE" in proc.stderr


def test_a_tampered_file_inside_an_intact_archive_is_refused(local: Env, tmp_path: Path) -> None:
    """zstd's checksum is not the only guard: a bundle rewritten with one file changed
    (valid archive, valid compression) fails the manifest check."""
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    good = tmp_path / "good.envfs"
    local.run("export", "wf/t", "-o", str(good))
    raw = subprocess.run(["zstd", "-d", "-q", "-c", str(good)], capture_output=True, check=True)
    tar = raw.stdout
    marker = b"VERSION = '1.0'"  # in a package's __init__.py
    at = tar.find(marker)
    assert at > 0
    tar = tar[:at] + b"VERSION = '6.6'" + tar[at + len(marker) :]
    evil = tmp_path / "evil.envfs"
    evil.write_bytes(
        subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
    )
    target = make_env(tmp_path / "target", None, host="t", seed=False)
    proc = target.run("import", str(evil), check=False)
    assert proc.returncode == 3 and "does not match its manifest" in proc.stderr, proc.stderr
    assert _entries(target.store) == []


def test_a_template_is_what_the_env_was_built_from(local: Env, tmp_path: Path) -> None:
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    dest = tmp_path / "tpl"
    local.run("export", "wf/t", "--template", str(dest))
    spec = local.store / "specs" / _sid(local, "wf/t")
    assert (dest / "uv.lock").read_text() == (spec / "uv.lock").read_text()
    assert (dest / "pyproject.toml").read_text() == (spec / "pyproject.toml").read_text()
    assert (dest / ".python-version").read_text().startswith("3.12")
    proc = local.run("export", "wf/t", "--template", str(dest), check=False)
    assert proc.returncode == 3 and "already" in proc.stderr  # nothing overwritten


def test_the_sbom_lists_every_package_and_is_valid_and_the_same_twice(local: Env) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    first = local.run("sbom", "wf/t").stdout
    assert local.run("sbom", "wf/t@1", "--format", "cyclonedx-json").stdout == first
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(first) is None
    doc = json.loads(first)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    found = {c["name"]: c for c in doc["components"]}
    assert found["extra-a"]["version"] == "1.0" and found["base-lib"]["version"] == "1.0"
    assert found["extra-a"]["purl"] == "pkg:pypi/extra-a@1.0"
    assert found["cpython"]["version"].startswith("3.12")
    assert "hashes" not in found["extra-a"]  # a lock pins no hash for a local wheel path
    assert doc["metadata"]["component"]["version"] == _sid(local, "wf/t")


def test_the_sbom_hash_is_the_one_the_lock_pins_for_the_file_installed() -> None:
    from envfs.build.sbom import _installed_hash, pinned_sha256

    lock = """
[[package]]
name = "NumPy"
version = "2.1.3"
sdist = { url = "https://x/numpy-2.1.3.tar.gz", hash = "sha256:aa" }
wheels = [
    { url = "https://x/numpy-2.1.3-cp312-cp312-musllinux_1_2_x86_64.whl", hash = "sha256:bb" },
    { url = "https://x/WHEEL", hash = "sha256:cc" },
]
[[package]]
name = "six"
version = "1.16.0"
wheels = [{ url = "https://x/six-1.16.0-py2.py3-none-any.whl", hash = "sha256:dd" }]
"""
    wheel = "numpy-2.1.3-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    pins = pinned_sha256(lock.replace("WHEEL", wheel))
    manylinux = {"cp312-cp312-manylinux_2_17_x86_64", "cp312-cp312-manylinux2014_x86_64"}
    assert _installed_hash(pins[("numpy", "2.1.3")], manylinux) == "cc"
    assert _installed_hash(pins[("numpy", "2.1.3")], {"cp312-cp312-linux_x86_64"}) == "aa"
    assert _installed_hash(pins[("six", "1.16.0")], {"py3-none-any"}) == "dd"


def _podman_env(tmp_path: Path) -> dict[str, str]:
    """Podman on this machine: runc (crun fails on its mixed cgroups) and raised ulimits."""
    conf = tmp_path / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return dict(os.environ, CONTAINERS_CONF=str(conf))


def test_an_oci_image_is_the_same_twice_and_runs_the_env_in_a_container(
    local: Env, tmp_path: Path
) -> None:
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    sid = _sid(local, "wf/t")
    one, two = tmp_path / "one", tmp_path / "two"
    local.run("export", "wf/t", "--oci", str(one))
    local.run("export", "wf/t@1", "--oci", str(two))
    index = json.loads((one / "index.json").read_text())
    assert index == json.loads((two / "index.json").read_text())
    assert json.loads((one / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((one / "blobs/sha256" / digest).read_text())
    assert len(manifest["layers"]) == 3
    config = json.loads((one / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["config"]["Entrypoint"] == ["/envs/wf/t/bin/python"]
    assert config["config"]["Labels"]["dev.envfs.snapshot-id"] == sid
    assert config["config"]["Labels"]["dev.envfs.sbom"] == "/envs/.sbom/wf/t.cdx.json"
    # another env of the same interpreter shares the interpreter layer
    local.run("build", "wf/u", "extra-b==2.0", "--python", PY)
    local.run("export", "wf/u", "--oci", str(tmp_path / "three"))
    other = json.loads((tmp_path / "three/index.json").read_text())["manifests"][0]["digest"]
    layers = json.loads((tmp_path / "three/blobs/sha256" / other[7:]).read_text())["layers"]
    assert layers[1] == manifest["layers"][1] and layers[2] != manifest["layers"][2]
    proc = local.run("export", "wf/t", "--oci", str(one), check=False)  # not over an image
    assert proc.returncode != 0 and "not empty" in proc.stderr
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are not installed (scripts/setup installs them)")
    env = _podman_env(tmp_path)
    pulled = subprocess.run(
        ["podman", "pull", "-q", f"oci:{one}"], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    image = pulled.stdout.strip().splitlines()[-1]
    try:
        run = subprocess.run(
            ["podman", "run", "--rm", "--network", "none", "--user", "65534:65534", image,
             "-c", "import extra_a, sys, json; print(sys.prefix, extra_a.VERSION, "
                   "json.load(open('/envs/.sbom/wf/t.cdx.json'))['bomFormat'])"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["/envs/wf/t", "1.0", "CycloneDX"]
    finally:
        subprocess.run(["podman", "rmi", "-f", image], capture_output=True, env=env, timeout=120)


def test_an_image_over_a_users_base_keeps_its_layers_and_settings(
    local: Env, tmp_path: Path
) -> None:
    local.run("build", "wf/t", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/u", "extra-b==2.0", "--python", PY)
    base, image = tmp_path / "base", tmp_path / "image"
    local.run("export", "wf/t", "--oci", str(base))
    local.run("export", "wf/u", "--oci", str(image), "--base", f"oci:{base}:latest")

    def manifest(layout: Path) -> dict[str, Any]:
        digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
        return dict(json.loads((layout / "blobs/sha256" / digest[7:]).read_text()))

    under, over = manifest(base), manifest(image)
    assert over["layers"][:3] == under["layers"] and len(over["layers"]) == 5
    config = json.loads((image / "blobs/sha256" / over["config"]["digest"][7:]).read_text())
    assert config["config"]["Entrypoint"] == ["/envs/wf/u/bin/python"]
    assert config["config"]["Labels"]["dev.envfs.binding"] == "wf/u@1"
    assert config["rootfs"]["diff_ids"][:3] == [d["digest"] for d in under["layers"]]
    for bad, words in ((f"oci:{base}:nope", "no image tagged"), ("docker://x", "oci:DIR")):
        proc = local.run("export", "wf/u", "--oci", str(tmp_path / "x"), "--base", bad,
                         check=False)  # fmt: skip
        assert proc.returncode == 3 and words in proc.stderr, proc.stderr
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are not installed (scripts/setup installs them)")
    env = _podman_env(tmp_path)
    pulled = subprocess.run(["podman", "pull", "-q", f"oci:{image}"], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    found = pulled.stdout.strip().splitlines()[-1]
    try:
        run = subprocess.run(
            ["podman", "run", "--rm", "--network", "none", found, "-c",
             "import extra_b; print(extra_b.VERSION)"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0 and run.stdout.strip() == "2.0", run.stderr
    finally:
        subprocess.run(["podman", "rmi", "-f", found], capture_output=True, env=env, timeout=120)
