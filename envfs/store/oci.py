"""OCI images of an env (``envfs export --oci DIR``, ``--oci-archive FILE``): an image
layout (image-spec v1.1: ``oci-layout``, ``index.json``, ``blobs/sha256/``) whose
filesystem holds the env at ``/envs/WF/NODE`` and runs it with no Python in the image.
This module owns the format.

Three layers, uncompressed tars written the same way every time (sorted entries, mtime 0,
owner 0:0), so one snapshot gives one manifest digest:

1. the C runtime that manylinux wheels assume (glibc's core, libgcc_s, libstdc++, libz),
   copied from this node at their merged-/usr paths, ``/lib`` and ``/lib64`` as links;
2. the captured interpreter at ``/envs/.interpreters/<digest>/``: the same bytes for every
   env of that interpreter, so images of such envs share this layer;
3. the env at ``/envs/WF/NODE/``: its own files, and a symbolic link into layer 2 for each
   file it shares with the interpreter, but the executable (a real file: Python finds
   its prefix from where the executable is).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from envfs.core.errors import BadInput, EnvironmentProblem
from envfs.store.files import fixed_tarinfo

#: The C runtime libraries a manylinux wheel may link against beyond what it bundles.
RUNTIME_LIBS = (
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libutil.so.1",
    "libresolv.so.2",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
)
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64")
LAYER = "application/vnd.oci.image.layer.v1.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Entry:
    """One layer entry: a directory, a file (copied from ``source``) or a symbolic link."""

    name: str  # absolute path in the image, without the leading "/"
    kind: str  # "dir", "file", "symlink"
    mode: int = 0o755
    source: Path | None = None
    target: str = ""


def runtime_entries() -> list[Entry]:
    """Layer 1: the C runtime libraries, found on this node (a missing one is an error)."""
    entries = [
        Entry("lib", "symlink", target="usr/lib"),
        Entry("lib64", "symlink", target="usr/lib64"),
        Entry("usr/lib64/ld-linux-x86-64.so.2", "symlink",
              target="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        Entry("tmp", "dir", mode=0o1777),
    ]  # fmt: skip
    for name in RUNTIME_LIBS:
        found = next((Path(d, name) for d in _LIB_DIRS if Path(d, name).exists()), None)
        if found is None:
            raise EnvironmentProblem(f"{name} is not on this node: cannot make the runtime layer")
        real = found.resolve()
        entries.append(Entry(f"usr/lib/x86_64-linux-gnu/{name}", "file", 0o755, real))
    return entries


def tree_entries(root: Path, prefix: str, links: dict[str, str] | None = None) -> list[Entry]:
    """The files of a tree at ``prefix`` in the image (its ``.envfs/`` aside); a file whose
    relative path is in ``links`` becomes a symbolic link to the path given there."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".envfs"]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            where = f"{prefix}/{rel}"
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry(where, "symlink", target=os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(where, "dir", stat.S_IMODE(st.st_mode) | 0o555))
            elif links is not None and rel in links:
                out.append(Entry(where, "symlink", target=links[rel]))
            else:
                out.append(Entry(where, "file", stat.S_IMODE(st.st_mode) | 0o444, path))
    return out


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed layer: the entries and every parent directory, sorted, mtime 0."""
    byname = {e.name: e for e in entries}
    for e in entries:
        for parent in PurePosixPath(e.name).parents:
            if str(parent) != "." and str(parent) not in byname:
                byname[str(parent)] = Entry(str(parent), "dir")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(byname):
            e = byname[name]
            if e.kind == "dir":
                tar.addfile(fixed_tarinfo(name, tarfile.DIRTYPE, e.mode))
            elif e.kind == "symlink":
                tar.addfile(fixed_tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=e.target))
            else:
                assert e.source is not None
                size = os.stat(e.source).st_size
                with open(e.source, "rb") as f:
                    tar.addfile(fixed_tarinfo(name, tarfile.REGTYPE, e.mode, size=size), f)
    return buf.getvalue()


def _blob(dest: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = dest / "blobs" / "sha256" / digest
    if not path.exists():
        path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Base:
    """A base image read from a user's OCI layout (``--base oci:DIR[:TAG]``)."""

    layout: Path
    layers: list[dict[str, Any]]  # its layer descriptors, as they are (compressed or not)
    diff_ids: list[str]
    config: dict[str, Any]  # its image config's ``config`` (Env, User, WorkingDir, ...)


def read_base(ref: str) -> Base:
    """The image ``oci:DIR[:TAG]`` names (TAG: its ``org.opencontainers.image.ref.name``;
    none: the layout's only image); amd64/linux from a multi-platform index."""
    if not ref.startswith("oci:"):
        raise BadInput(f"--base {ref!r}: give oci:DIR[:TAG] (an OCI image layout)")
    where, _, tag = ref[4:].partition(":")
    layout = Path(where)
    try:
        index = json.loads((layout / "index.json").read_bytes())
        chosen = [
            m for m in index.get("manifests", [])
            if not tag or m.get("annotations", {}).get(_REF_NAME) == tag
        ]  # fmt: skip
        if len(chosen) != 1:
            what = f"no image tagged {tag!r}" if tag else f"{len(chosen)} images (give :TAG)"
            raise BadInput(f"--base {ref}: the layout has {what}")
        manifest = _read_json(layout, chosen[0]["digest"])
        if manifest.get("mediaType") == INDEX or "manifests" in manifest:
            found = [
                m for m in manifest["manifests"]
                if m.get("platform", {}).get("architecture") == "amd64"
                and m.get("platform", {}).get("os") == "linux"
            ]  # fmt: skip
            if not found:
                raise BadInput(f"--base {ref}: no linux/amd64 image in it")
            manifest = _read_json(layout, found[0]["digest"])
        config = _read_json(layout, manifest["config"]["digest"])
        return Base(
            layout,
            list(manifest["layers"]),
            list(config["rootfs"]["diff_ids"]),
            dict(config.get("config") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"--base {ref}: not a readable OCI image layout ({exc})") from None


def _read_json(layout: Path, digest: str) -> Any:
    return json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())


def write_layout(
    dest: Path,
    layers: list[bytes],
    entrypoint: list[str],
    env: list[str],
    labels: dict[str, str],
    created: str,
    base: Base | None = None,
) -> str:
    """Write an OCI image layout of ``layers`` (over ``base``'s, if given) at ``dest`` (new
    or empty); the manifest's digest (the same for the same inputs)."""
    if dest.exists() and any(dest.iterdir()):
        raise EnvironmentProblem(f"{dest} is not empty: give a new directory for the image")
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    descriptors = [{"mediaType": LAYER, **_blob(dest, layer)} for layer in layers]
    diff_ids = [d["digest"] for d in descriptors]
    settings: dict[str, Any] = {"Entrypoint": entrypoint, "Env": env, "Labels": labels}
    if base is not None:
        for layer in base.layers:
            name = str(layer["digest"]).removeprefix("sha256:")
            shutil.copyfile(base.layout / "blobs" / "sha256" / name, dest / "blobs/sha256" / name)
        descriptors = [*base.layers, *descriptors]
        diff_ids = [*base.diff_ids, *diff_ids]
        ours = {e.split("=", 1)[0] for e in env}
        kept = [e for e in base.config.get("Env") or [] if e.split("=", 1)[0] not in ours]
        settings = {
            **{k: v for k, v in base.config.items() if k not in ("Entrypoint", "Cmd")},
            "Entrypoint": entrypoint,
            "Env": [*kept, *env],
            "Labels": {**(base.config.get("Labels") or {}), **labels},
        }
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": settings,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **_blob(dest, _json(config))},
        "layers": descriptors,
        "annotations": {"org.opencontainers.image.created": created, **labels},
    }
    described = _blob(dest, _json(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": MANIFEST,
                **described,
                "annotations": {_REF_NAME: "latest"},
            }
        ],
    }
    (dest / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(_json(index))
    return str(described["digest"])


def write_archive(layout: Path, out: IO[bytes]) -> None:
    """The image layout at ``layout`` as one tar on ``out`` (``podman load``, ``docker
    load`` and ``skopeo copy oci-archive:``), written the same way every time."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        names = ["blobs", "blobs/sha256", "index.json", "oci-layout"]
        names += [f"blobs/sha256/{n}" for n in os.listdir(layout / "blobs" / "sha256")]
        for name in sorted(names):
            path = layout / name
            if path.is_dir():
                tar.addfile(fixed_tarinfo(name, tarfile.DIRTYPE, 0o755))
                continue
            with open(path, "rb") as f:
                tar.addfile(fixed_tarinfo(name, tarfile.REGTYPE, 0o644, path.stat().st_size), f)
