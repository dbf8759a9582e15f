"""Specs: turn user inputs into a uv project (pyproject.toml + uv.lock) and a snapshot id.

The snapshot id is sha256 over the canonical lock, the canonical pyproject (it decides which
groups a frozen sync installs), the exact interpreter (implementation, version, ABI, and the
digest of its captured copy in the store), the platform tag and envfs's layout version.
Same inputs, same id, on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from envfs.build.sources import (
    _is_local_url,
    _parse,
)
from envfs.core.errors import BadInput
from envfs.store.formats import LAYOUT_VERSION, Interpreter, Selection

ENV_PROJECT_NAME = "envfs-env"
# a PEP 508 requirement starts with a distribution name; options and paths are refused
_REQ_START = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class ProjectFiles:
    """A uv project as text: what ``specs/<id>/`` keeps."""

    pyproject: str
    lock: str


@dataclass(frozen=True)
class RequirementsFile:
    """A ``-r`` file: its requirements, and the hashes each may have (by normalized name),
    as ``uv export`` and ``pip-compile --generate-hashes`` write them."""

    requirements: list[str]
    hashes: dict[str, frozenset[str]]


_HASH = re.compile(r"^--hash[= ](sha256:[0-9a-f]{64})$")


def read_requirements_file(path: Path) -> RequirementsFile:
    """Requirements from a ``-r`` file: one per line (``\\`` continues a line), ``#``
    comments, ``--hash=sha256:...`` options kept; other pip options refused."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"cannot read requirements file {path}: {exc.strerror}") from exc
    reqs: list[str] = []
    hashes: dict[str, frozenset[str]] = {}
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("#"):
            line = ""
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending, start = "", 0
    if pending:
        logical.append((start, pending))
    for number, line in logical:
        words = line.split()
        if not words:
            continue
        if words[0].startswith("-"):
            raise BadInput(
                f"{path}:{number}: pip option {words[0]!r} is not supported; "
                "list requirements (with --hash options if you like), or use --project"
            )
        options = [w for w in words if w.startswith("--")]
        req = " ".join(w for w in words if not w.startswith("--"))
        allowed = set()
        for option in " ".join(options).replace("--hash ", "--hash=").split():
            match = _HASH.match(option)
            if match is None:
                raise BadInput(f"{path}:{number}: option {option!r} is not supported here")
            allowed.add(match[1])
        reqs.append(req)
        if allowed:
            hashes[project_name(req)] = frozenset(allowed)
    return RequirementsFile(reqs, hashes)


def _file_digest(path: object) -> str | None:
    """``sha256:<hex>`` of a local artifact a lock names by path (no hash recorded)."""
    if not isinstance(path, str):
        return None
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def project_name(req: str) -> str:
    """A requirement's project name, normalized (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return re.sub(r"[-_.]+", "-", match[1]).lower() if match else req


def check_hashes(lock: str, hashes: dict[str, frozenset[str]], source: str) -> None:
    """Refuse a lock that could install a file the requirements' hashes do not allow: with
    hashes given, every locked package needs them, and every artifact the lock may install
    for it must be one of them (as pip's --require-hashes)."""
    if not hashes:
        return
    for pkg in _installed(tomllib.loads(lock)):
        name = project_name(str(pkg.get("name", "")))
        allowed = hashes.get(name)
        if allowed is None:
            raise BadInput(f"{source}: {name} has no --hash line (all requirements need one)")
        artifacts = [pkg["sdist"]] if "sdist" in pkg else []
        artifacts += pkg.get("wheels", [])
        for artifact in artifacts:
            digest = artifact.get("hash") or _file_digest(artifact.get("path"))
            if digest not in allowed:
                raise BadInput(
                    f"{source}: {name} {pkg.get('version')}: {digest} is not one of its "
                    "--hash values; the index offers a file the requirements do not allow"
                )


def normalize_requirements(
    reqs: list[str], allow_local: bool = False, index_only: bool = False
) -> list[str]:
    """Validate the shape of requirements and put them in a canonical order.

    A requirement naming a local path (``pkg @ file:///dir``, ``pkg @ git+file:///dir``) is
    refused unless ``allow_local``: its content is not part of the lock or the snapshot id,
    so a changed source would build under the same id (and its build backend runs on this
    node). ``index_only`` (requests over the API) refuses every direct reference: a package
    comes from an index or not at all.
    """
    out = []
    for req in reqs:
        req = " ".join(req.split())
        if not req:
            continue
        parsed = _parse(req) if _REQ_START.match(req) and "\0" not in req else None
        if parsed is None:
            raise BadInput(
                f"{req!r} is not a requirement; give names like 'numpy' or 'six==1.16.0'"
            )
        if parsed.url is not None and index_only:
            raise BadInput(
                f"{req!r} names a URL or path; only packages from an index are allowed here"
            )
        if parsed.url is not None and not allow_local and _is_local_url(parsed.url):
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


@dataclass(frozen=True)
class Indexes:
    """The package indexes a requirement list is locked against, the uv way: ``default``
    replaces PyPI, ``extra`` ones are asked first. URLs carry no credentials: those live in
    ``secrets`` (as the ``UV_INDEX_<NAME>_USERNAME``/``_PASSWORD`` variables uv reads, for
    this process's uv calls only), never in the store or the id."""

    default: str | None = None
    extra: tuple[str, ...] = ()
    secrets: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: ``--build-policy wheels-only``: uv may not build a source distribution (no package's
    #: build code runs); how an env is installed, not what it is (not in the id)
    no_build: bool = field(default=False, compare=False)

    def named(self) -> list[tuple[str, str, bool]]:
        """(name, url, is_default) in uv's order of priority."""
        out = [(f"envfs-extra-{i}", url, False) for i, url in enumerate(self.extra, 1)]
        return out + ([("envfs-default", self.default, True)] if self.default else [])


def _credential_vars(name: str) -> str:
    return "UV_INDEX_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def split_credentials(url: str, what: str) -> tuple[str, str | None, str | None]:
    """An index URL without its ``user:password@`` part, and that part."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise BadInput(f"{what} {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"{what} {url!r} is not an http(s) URL of a package index")
    netloc = parts.netloc.rpartition("@")[2]
    public = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return public, user, password


def make_indexes(default: str | None, extra: tuple[str, ...] | list[str]) -> Indexes:
    """Indexes from ``--index-url`` and ``--extra-index-url`` values (credentials split off)."""
    secrets: dict[str, str] = {}
    public: list[str] = []
    given = [
        *(("--extra-index-url", u) for u in extra),
        *([("--index-url", default)] if default else []),
    ]
    names = Indexes(default, tuple(extra)).named()
    for (name, _, _), (what, url) in zip(names, given, strict=True):
        clean, user, password = split_credentials(url, what)
        public.append(clean)
        prefix = _credential_vars(name)
        if user is not None:
            secrets[f"{prefix}_USERNAME"] = user
        if password is not None:
            secrets[f"{prefix}_PASSWORD"] = password
    return Indexes(
        default=public[-1] if default else None,
        extra=tuple(public[: len(extra)]),
        secrets=secrets,
    )


def check_project_indexes(pyproject: str, source: str) -> None:
    """Refuse a project whose pyproject carries index credentials: the pyproject is kept in
    the store and hashed into the id. uv reads them from the environment or ~/.netrc."""
    uv = tomllib.loads(pyproject).get("tool", {}).get("uv", {})
    urls = [i.get("url") for i in uv.get("index", []) if isinstance(i, dict)]
    urls += [uv.get("index-url"), *uv.get("extra-index-url", [])]
    for url in urls:
        if isinstance(url, str) and "@" in urllib.parse.urlsplit(url).netloc:
            raise BadInput(
                f"{source}: index URL {url.split('@')[-1]!r} has credentials in it; "
                "give them as UV_INDEX_<NAME>_USERNAME/_PASSWORD or in ~/.netrc instead"
            )


def check_selection(pyproject: str, selection: Selection, source: str) -> None:
    """Refuse extras and groups the project does not define, and ``--install-project``
    for a project that is not a package."""
    data = tomllib.loads(pyproject)
    extras = {project_name(x) for x in data.get("project", {}).get("optional-dependencies", {})}
    groups = {project_name(x) for x in data.get("dependency-groups", {})}
    for extra in selection.extras:
        if project_name(extra) not in extras:
            known = ", ".join(sorted(extras)) or "none"
            raise BadInput(f"{source} has no extra {extra!r} (its extras: {known})")
    for group in selection.groups:
        if project_name(group) not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise BadInput(f"{source} has no dependency group {group!r} (its groups: {known})")


def render_pyproject(reqs: list[str], interp: Interpreter, indexes: Indexes | None = None) -> str:
    """The pyproject.toml envfs writes for a requirement list (and its indexes)."""
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
    if indexes is not None and indexes.named():
        entries = tomlkit.aot()
        for name, url, default in indexes.named():
            entry = tomlkit.table()
            entry.add("name", name)
            entry.add("url", url)
            if default:
                entry.add("default", True)
            entries.append(entry)
        uv = tomlkit.table()
        uv.add("index", entries)
        tool = tomlkit.table(is_super_table=True)
        tool.add("uv", uv)
        doc.add("tool", tool)
    return tomlkit.dumps(doc)


def locked_packages(lock: str) -> list[tuple[str, str]]:
    """(name, version) of every package a ``uv.lock`` installs, by name; the project itself
    (a virtual or editable source) is not one of them."""
    try:
        data = tomllib.loads(lock)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"unreadable uv.lock: {exc}") from exc
    out = [(str(p.get("name", "?")), str(p.get("version", "?"))) for p in _installed(data)]
    return sorted(out)


def _installed(lock: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The ``[[package]]`` entries of a parsed ``uv.lock`` that get installed: all but the
    project itself (a virtual or editable source)."""
    for pkg in lock.get("package", []):
        source = pkg.get("source", {})
        if "virtual" not in source and "editable" not in source:
            yield pkg


def project_python(directory: Path) -> tuple[str | None, str | None]:
    """What a uv project asks of its interpreter: its ``.python-version`` (first line) and
    its ``requires-python``, each None if absent."""
    pinned = None
    with contextlib.suppress(OSError):
        lines = [x.strip() for x in (directory / ".python-version").read_text().splitlines()]
        pinned = next((x for x in lines if x and not x.startswith("#")), None)
    try:
        data = tomllib.loads((directory / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return pinned, None
    requires = data.get("project", {}).get("requires-python")
    return pinned, requires if isinstance(requires, str) else None


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


def snapshot_id(
    files: ProjectFiles, interp: Interpreter, selection: Selection | None = None
) -> str:
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
    if selection is not None and selection != Selection():
        material["selection"] = selection.model_dump_json()
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def input_key(reqs: list[str], interp: Interpreter, indexes: Indexes | None = None) -> str:
    """Key of a requirement list (before locking): the same list reuses its first lock."""
    material: dict[str, Any] = {
        "layout": LAYOUT_VERSION,
        "reqs": reqs,
        "interp": interp.key,
        "plat": interp.platform,
        "digest": interp.digest,
    }
    if indexes is not None and indexes.named():
        material["indexes"] = indexes.named()
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
