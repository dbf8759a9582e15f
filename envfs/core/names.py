"""Validation of names that come from users: workflows, nodes and ``WF/NODE`` targets."""

from __future__ import annotations

import re

from envfs.core.errors import BadInput

MAX_NAME = 128
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$"  # for documents (JSON Schema); code uses _NAME
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")  # fullmatch: "$" would let a final newline in


def validate_name(name: str, what: str = "name") -> str:
    """A workflow or node name: letters, digits, ``._+-``, no leading dot, at most 128 chars."""
    if not name:
        raise BadInput(f"empty {what}; give a name like 'etl/prep'")
    if "\0" in name:
        raise BadInput(f"{what} contains a NUL byte; use letters, digits and ._+-")
    if len(name) > MAX_NAME:
        raise BadInput(f"{what} is {len(name)} characters long; the limit is {MAX_NAME}")
    if name in (".", "..") or name.startswith("."):
        raise BadInput(
            f"{what} {name!r} starts with a dot; names must start with a letter or digit"
        )
    if not _NAME.fullmatch(name):
        raise BadInput(f"{what} {name!r} has characters other than letters, digits and ._+-")
    return name


#: A revision number as envfs writes it: ASCII decimal, no sign, no leading zero, no space.
#: Anything else (``01``, ``+1``, a fullwidth or superscript digit) names no revision, so
#: one revision has exactly one name (the kernel mounts and caches views by name).
_REVISION = re.compile(r"[1-9][0-9]{0,17}")


def parse_revision(text: str) -> int | None:
    """The revision ``text`` names in its canonical form, else None."""
    return int(text) if _REVISION.fullmatch(text) else None


def parse_target(target: str) -> tuple[str, str]:
    """``WF/NODE`` -> (wf, node), both validated."""
    parts = target.split("/")
    if len(parts) != 2:
        raise BadInput(f"{target!r} is not WORKFLOW/NODE (exactly one '/'), e.g. 'etl/prep'")
    return validate_name(parts[0], "workflow"), validate_name(parts[1], "node")


def parse_pinned(target: str) -> tuple[str, str, int | None]:
    """``WF/NODE[@REV]`` -> (wf, node, revision or None), all validated."""
    name, at, rev = target.partition("@")
    wf, node = parse_target(name)
    if not at:
        return wf, node, None
    revision = parse_revision(rev)
    if revision is None:
        raise BadInput(f"revision {rev!r} is not a number; see `envfs history {name}`")
    return wf, node, revision
