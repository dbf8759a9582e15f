"""A snapshot's software bill of materials: a CycloneDX 1.6 JSON document (written with
cyclonedx-python-lib) listing the interpreter and every installed distribution with its
version, its PURL and the sha256 the lock pins for the file installed. The same snapshot
always gives the same bytes: the serial number is derived from the snapshot id and the
timestamp is when it was built."""

from __future__ import annotations

import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from envfs.build.spec import project_name
from envfs.store.formats import Manifest, SpecInfo

#: Namespace of the serial numbers (a UUID5 of the snapshot id).
_SERIALS = uuid.UUID("7d3c1f5e-2b8a-4c57-9f0e-5a1e6b2d8c40")


def installed(root: Path) -> list[tuple[str, str, set[str]]]:
    """(normalized name, version, wheel tags) of each distribution installed in a snapshot."""
    out = []
    for site in sorted(root.glob("lib/python*/site-packages")):
        for dist in sorted(site.glob("*.dist-info")):
            name, _, version = dist.name.removesuffix(".dist-info").partition("-")
            tags = set()
            try:
                for line in (dist / "WHEEL").read_text().splitlines():
                    if line.startswith("Tag:"):
                        tags.add(line.split(":", 1)[1].strip())
            except OSError:
                pass
            out.append((project_name(name), version, tags))
    return sorted(out, key=lambda d: (d[0], d[1]))


def pinned_sha256(lock: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(name, version) -> [(artifact file name, sha256)] the lock pins (wheels and sdist)."""
    data: dict[str, Any] = tomllib.loads(lock)
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for pkg in data.get("package", []):
        key = (project_name(str(pkg.get("name", ""))), str(pkg.get("version", "")))
        files = list(pkg.get("wheels", []))
        if isinstance(pkg.get("sdist"), dict):
            files.append(pkg["sdist"])
        for f in files:
            url, digest = str(f.get("url") or f.get("path") or ""), str(f.get("hash", ""))
            if digest.startswith("sha256:"):
                out.setdefault(key, []).append((url.rsplit("/", 1)[-1], digest[7:]))
    return out


def _wheel_tags(filename: str) -> set[str]:
    """The tags a wheel file name covers (``py2.py3-none-any`` expanded)."""
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) < 5 or not filename.endswith(".whl"):
        return set()
    pys, abis, plats = (p.split(".") for p in parts[-3:])
    return {f"{a}-{b}-{c}" for a in pys for b in abis for c in plats}


def _installed_hash(pins: list[tuple[str, str]], tags: set[str]) -> str | None:
    """The sha256 of the pinned file that was installed: the wheel whose tags the
    installed WHEEL names, else (built from source) the sdist, else the only pin."""
    for name, digest in pins:
        if tags & _wheel_tags(name):
            return digest
    sdists = [d for n, d in pins if not n.endswith(".whl")]
    if sdists:
        return sdists[0]
    return pins[0][1] if len(pins) == 1 else None


def render(
    root: Path, spec: SpecInfo, manifest: Manifest, lock: str, binding: str | None = None
) -> str:
    """The CycloneDX 1.6 JSON document of the snapshot at ``root``."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    sid = spec.snapshot_id
    bom = Bom(serial_number=uuid.uuid5(_SERIALS, sid))
    bom.metadata.timestamp = datetime.fromtimestamp(int(manifest.built_at), UTC)
    bom.metadata.component = Component(
        name=binding or f"envfs-snapshot-{sid[:12]}",
        version=sid,
        type=ComponentType.APPLICATION,
        bom_ref=f"envfs:{sid}",
        properties=[Property(name="envfs:snapshot_id", value=sid)],
    )
    interp = spec.interpreter
    runtime = Component(
        name=interp.implementation,
        version=interp.version,
        type=ComponentType.PLATFORM,
        bom_ref=f"interpreter:{interp.implementation}@{interp.version}",
        purl=PackageURL("generic", name=interp.implementation, version=interp.version),
        properties=[Property(name="envfs:abi", value=interp.abi)]
        + (
            [Property(name="envfs:interpreter_digest", value=interp.digest)]
            if interp.digest
            else []
        ),
    )
    bom.components.add(runtime)
    pins = pinned_sha256(lock)
    for name, version, tags in installed(root):
        digest = _installed_hash(pins.get((name, version), []), tags)
        bom.components.add(
            Component(
                name=name,
                version=version,
                type=ComponentType.LIBRARY,
                bom_ref=f"pypi:{name}@{version}",
                purl=PackageURL("pypi", name=name, version=version),
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)] if digest else [],
            )
        )
    return str(JsonV1Dot6(bom).output_as_string(indent=2)) + "\n"
