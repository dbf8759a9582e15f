"""Specs: turn user inputs into a uv project (pyproject.toml + uv.lock) and a snapshot id.

The snapshot id is sha256 over the canonical lock, the canonical pyproject (it decides which
groups a frozen sync installs), the exact interpreter (implementation, version, ABI, and the
digest of its captured copy in the store), the platform tag and envfs's layout version.
Same inputs, same id, on every node.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from envfs.errors import BadInput
from envfs.model import LAYOUT_VERSION, Interpreter

ENV_PROJECT_NAME = "envfs-env"
# a PEP 508 requirement starts with a distribution name; options and paths are refused
_REQ_START = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class ProjectFiles:
    """A uv project as text: what ``specs/<id>/`` keeps."""

    pyproject: str
    lock: str


def read_requirements_file(path: Path) -> list[str]:
    """Requirements from a ``-r`` file: one per line, ``#`` comments; pip options refused."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"cannot read requirements file {path}: {exc.strerror}") from exc
    reqs = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise BadInput(
                f"{path}:{number}: pip option {line.split()[0]!r} is not supported; "
                "list plain requirements, or use --project with a uv project"
            )
        reqs.append(line)
    return reqs


#: ``name @ <url>`` where the URL is a local file or directory (``file:``, or a path).
_LOCAL_URL = re.compile(r"@\s*(file:|/|\.{1,2}/|~)")


def normalize_requirements(reqs: list[str], allow_local: bool = False) -> list[str]:
    """Validate the shape of requirements and put them in a canonical order.

    A requirement naming a local path (``pkg @ file:///dir``) is refused unless
    ``allow_local``: its content is not part of the lock or the snapshot id, so a changed
    source would build under the same id (and its build backend runs on this node).
    """
    out = []
    for req in reqs:
        req = " ".join(req.split())
        if not req:
            continue
        if not _REQ_START.match(req) or "\0" in req:
            raise BadInput(
                f"{req!r} is not a requirement; give names like 'numpy' or 'six==1.16.0'"
            )
        if not allow_local and _LOCAL_URL.search(req.split(";", 1)[0]):
            raise BadInput(
                f"{req!r} names a local path, whose content is not part of the env's id; "
                "publish it to an index, or pass --allow-local"
            )
        out.append(req)
    if not out:
        raise BadInput("no packages given; name packages, or use -r FILE or --project DIR")
    return sorted(set(out), key=str.lower)


_EXACT_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*===?\s*[^\s*,;]+$")


def is_exact_pin(req: str) -> bool:
    """``name==1.2.3`` (extras allowed, no wildcard, no marker): one version, wherever it
    is resolved, so the cache alone resolves it as well as the index would."""
    return _EXACT_PIN.match(req) is not None


def render_pyproject(reqs: list[str], interp: Interpreter) -> str:
    """The pyproject.toml envfs writes for a requirement list."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("written by envfs from a requirement list"))
    project = tomlkit.table()
    project.add("name", ENV_PROJECT_NAME)
    project.add("version", "0")
    project.add("requires-python", f"=={interp.minor}.*")
    deps = tomlkit.array()
    deps.extend(reqs)
    deps.multiline(True)
    project.add("dependencies", deps)
    doc.add("project", project)
    return tomlkit.dumps(doc)


def locked_packages(lock: str) -> list[tuple[str, str]]:
    """(name, version) of every package a ``uv.lock`` installs, by name; the project itself
    (a virtual or editable source) is not one of them."""
    try:
        data = tomllib.loads(lock)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"unreadable uv.lock: {exc}") from exc
    out = []
    for pkg in data.get("package", []):
        source = pkg.get("source", {})
        if "virtual" in source or "editable" in source:
            continue
        out.append((str(pkg.get("name", "?")), str(pkg.get("version", "?"))))
    return sorted(out)


def read_project(directory: Path) -> ProjectFiles:
    """A uv project directory (pyproject.toml + uv.lock), used exactly as locked."""
    pyproject, lock = directory / "pyproject.toml", directory / "uv.lock"
    if not pyproject.is_file():
        raise BadInput(f"{directory} has no pyproject.toml; --project needs a uv project")
    if not lock.is_file():
        raise BadInput(
            f"{directory} has no uv.lock; run `uv lock` in it first (envfs builds locked projects)"
        )
    try:
        files = ProjectFiles(pyproject=pyproject.read_text(), lock=lock.read_text())
        tomlkit.parse(files.pyproject)
        tomlkit.parse(files.lock)
    except (OSError, tomlkit.exceptions.TOMLKitError) as exc:
        raise BadInput(f"cannot read the project in {directory}: {exc}") from exc
    return files


def _canonical_toml(text: str) -> str:
    return json.dumps(tomlkit.parse(text).unwrap(), sort_keys=True, separators=(",", ":"))


def lock_digest(lock: str) -> str:
    return hashlib.sha256(_canonical_toml(lock).encode()).hexdigest()


def snapshot_id(files: ProjectFiles, interp: Interpreter) -> str:
    """The content address of the snapshot these files build with this interpreter."""
    material = {
        "layout": LAYOUT_VERSION,
        "lock": lock_digest(files.lock),
        "pyproject": hashlib.sha256(_canonical_toml(files.pyproject).encode()).hexdigest(),
        "interpreter": interp.key,
        "platform": interp.platform,
    }
    if interp.digest is not None:  # layout 2: the captured interpreter's bytes
        material["interpreter_digest"] = interp.digest
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def input_key(reqs: list[str], interp: Interpreter) -> str:
    """Key of a requirement list (before locking): the same list reuses its first lock."""
    blob = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "reqs": reqs,
            "interp": interp.key,
            "plat": interp.platform,
            "digest": interp.digest,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()
