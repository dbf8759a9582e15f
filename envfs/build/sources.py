"""Where a spec's packages may come from: requirements parsed by their grammar (packaging),
local and direct references told apart, and the index-only rule for what a remote client
sends (every uv source form, every requirement list, every uv.lock entry)."""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from envfs.core.errors import BadInput

if TYPE_CHECKING:
    from envfs.build.spec import ProjectFiles


def _parse(req: str) -> Any:
    """``req`` as a PEP 508 requirement (``packaging``), or None if it is none (else uv
    would take the list for a project to build, and run a build backend on it)."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(req)
    except InvalidRequirement:
        return None


def _is_local_url(url: str) -> bool:
    """Whether a direct reference names this machine's files: a path, ``file:``, or a VCS
    over ``file:`` (``git+file:``)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    return scheme.rpartition("+")[2] in ("", "file")


#: Keys of a ``[tool.uv.sources]`` entry that names an index (``{ index = "name" }``).
_INDEX_SOURCE_KEYS = frozenset({"index", "marker", "extra", "group"})


#: The project itself in a ``uv.lock``: ``{ virtual = "." }`` or ``{ editable = "." }``.
_ROOT_SOURCE_KEYS = frozenset({"virtual", "editable", "directory"})


def _is_http(url: object) -> bool:
    return isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ("http", "https")


def _project_requirements(project: dict[str, Any]) -> Iterator[object]:
    """Every requirement string a pyproject names: dependencies, extras, groups, uv's
    dev, override and constraint lists, and the build system's."""
    meta, uv = project.get("project", {}), project.get("tool", {}).get("uv", {})
    yield from meta.get("dependencies", [])
    for group in (meta.get("optional-dependencies", {}), project.get("dependency-groups", {})):
        for reqs in group.values():
            yield from (r for r in reqs if not isinstance(r, dict))  # {include-group = ..}
    for key in ("dev-dependencies", "override-dependencies", "constraint-dependencies"):
        yield from uv.get(key, [])
    yield from project.get("build-system", {}).get("requires", [])


#: uv's variables naming indexes: the CLI turns them into a spec's indexes (so the id covers
#: them); locks and builds of a requirement list then use only those.
INDEX_VARS = ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX")
#: uv's variables through which whoever runs envfs names its package indexes and find-links.
_REGISTRY_VARS = ("UV_FIND_LINKS", *INDEX_VARS)


def configured_registries(environ: Mapping[str, str]) -> frozenset[str]:
    """The indexes and find-links locations this process's own uv is configured with (a
    local wheelhouse may be one): a lock may name them, since the operator chose them."""
    out = set()
    for var in _REGISTRY_VARS:
        for item in re.split(r"[\s,]+", environ.get(var, "")):
            if item:
                out.add(item.rpartition("=")[2] if var == "UV_INDEX" else item)
    return frozenset(i.rstrip("/") for i in out)


def _locked_from_index(pkg: dict[str, Any], trusted: frozenset[str]) -> bool:
    """Whether a ``uv.lock`` entry is the project itself or comes from an http(s) index (or
    one the operator configured), its files included."""
    src = pkg.get("source", {})
    if src.keys() <= _ROOT_SOURCE_KEYS and set(src.values()) == {"."}:
        return True
    registry = src.get("registry") if src.keys() == {"registry"} else None
    if not (_is_http(registry) or (isinstance(registry, str) and registry.rstrip("/") in trusted)):
        return False
    for dist in [pkg.get("sdist", {}), *pkg.get("wheels", [])]:
        if "path" in dist:  # a wheel of a local registry: inside it
            path = os.path.normpath(str(dist["path"]))
            if _is_http(registry) or not path.startswith(str(registry).rstrip("/") + "/"):
                return False
        elif not _is_http(dist.get("url", "https:")):
            return False
    return True


def check_index_only(
    files: ProjectFiles, source: str, trusted: frozenset[str] = frozenset()
) -> None:
    """Refuse a project that would make uv read anything but package indexes over http(s):
    a path, directory, editable, git (any scheme) or URL source in ``[tool.uv.sources]``
    (table or list form), a direct reference in any requirement list, find-links, a
    workspace, a non-http index, or a lock entry from anywhere but such an index (or one of
    ``trusted``, the registries the operator configured). Checked before uv runs, since
    resolving a path source runs that directory's build backend."""
    try:
        project, locked = tomllib.loads(files.pyproject), tomllib.loads(files.lock)
        uv = project.get("tool", {}).get("uv", {})
        for key in ("find-links", "workspace"):
            if uv.get(key):
                raise BadInput(f"{source}: [tool.uv] {key} names local paths; not allowed here")
        indexes = [i.get("url") for i in uv.get("index", [])]
        indexes += [uv["index-url"]] if "index-url" in uv else []
        for url in [*indexes, *uv.get("extra-index-url", [])]:
            if not _is_http(url):
                raise BadInput(f"{source}: index {url!r} is not an http(s) URL")
        for name, value in uv.get("sources", {}).items():
            for entry in value if isinstance(value, list) else [value]:
                if (
                    not isinstance(entry, dict)
                    or "index" not in entry
                    or (entry.keys() - _INDEX_SOURCE_KEYS)
                ):
                    raise BadInput(
                        f"{source}: the source of {name!r} is not a package index "
                        "(path, git and URL sources are not allowed here)"
                    )
        for req in _project_requirements(project):
            parsed = _parse(req) if isinstance(req, str) else None
            if parsed is None or parsed.url is not None:
                raise BadInput(f"{source}: {req!r} is not a requirement on a package index")
        for pkg in locked.get("package", []):
            if not _locked_from_index(pkg, trusted):
                raise BadInput(
                    f"{source}: uv.lock takes {pkg.get('name')!r} from a path, git or URL "
                    "source; only packages from an http(s) index are allowed here"
                )
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{source}: pyproject or uv.lock is not TOML: {exc}") from None
    except (AttributeError, TypeError, KeyError):
        raise BadInput(f"{source}: pyproject or uv.lock has an unexpected shape") from None
