"""Tiny pure-Python wheels built locally, so real uv builds in tests need no network."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(
    directory: Path,
    name: str,
    version: str,
    *,
    modules: dict[str, str] | None = None,
    requires: list[str] | None = None,
    scripts: dict[str, str] | None = None,
    padding_files: int = 0,
) -> Path:
    """Write ``name-version-py3-none-any.whl`` with the given modules into ``directory``.

    ``scripts`` maps console script names to ``module:function``; ``padding_files`` adds that
    many small modules (to make installs take measurable time).
    """
    dist = name.replace("-", "_")
    files: dict[str, bytes] = {}
    for module, source in (modules or {f"{dist}/__init__.py": f"VERSION = {version!r}\n"}).items():
        files[module] = source.encode()
    for i in range(padding_files):
        files[f"{dist}/pad/m{i}.py"] = f"X = {i}\n".encode()
    info = f"{dist}-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires or []]
    files[f"{info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: envfs-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if scripts:
        lines = ["[console_scripts]"] + [f"{k} = {v}" for k, v in scripts.items()]
        files[f"{info}/entry_points.txt"] = ("\n".join(lines) + "\n").encode()
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            info_ = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info_, data)
    return path


def make_wheelhouse(directory: Path) -> Path:
    """The packages tests use: a shared base, two extras, a script, and a slow big one."""
    directory.mkdir(parents=True, exist_ok=True)
    make_wheel(
        directory,
        "base-lib",
        "1.0",
        modules={
            "base_lib/__init__.py": "def hello() -> str:\n    return 'hello from base_lib'\n",
            "base_lib/data.py": "BIG = " + repr("x" * 20000) + "\n",
        },
    )
    make_wheel(directory, "extra-a", "1.0", requires=["base-lib==1.0"])
    make_wheel(directory, "extra-b", "2.0", requires=["base-lib==1.0"])
    make_wheel(
        directory,
        "tool-pkg",
        "0.1",
        modules={
            "tool_pkg/__init__.py": (
                "import sys\n\ndef main() -> None:\n    print('tool', sys.prefix)\n"
            ),
        },
        scripts={"envfs-demo-tool": "tool_pkg:main"},
    )
    make_wheel(directory, "slow-pkg", "1.0", padding_files=4000)
    return directory
