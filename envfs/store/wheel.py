"""A wheel's ``RECORD`` (the installed files and their digests): read by the build's check
of what uv installed and by ``envfs verify`` of the shared uv cache."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator
from pathlib import Path


def record_digests(record: Path) -> Iterator[tuple[str, str | None]]:
    """(path relative to site-packages, sha256 hex) of each hashed row of a wheel's
    ``RECORD``; the digest is None when the row's hash does not decode (it matches nothing)."""
    for row in csv.reader(io.StringIO(record.read_text(errors="replace"))):
        if len(row) < 2 or not row[1].startswith("sha256="):
            continue
        b64 = row[1].removeprefix("sha256=")
        try:
            yield row[0], base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
        except ValueError:
            yield row[0], None
