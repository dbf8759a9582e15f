"""The ``envfs`` group: global options, progress, JSON output, and the one place errors
become one line on stderr and a documented exit code (see envfs/core/errors.py and
docs/operations.md). The commands live in the sibling modules of each command group."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from envfs.core.config import Settings
from envfs.core.errors import BadInput, EnvfsError, EnvironmentProblem
from envfs.service.envs import Service

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable[..., Any])


def _progress(message: str) -> None:
    click.echo(f"envfs: {message}", err=True)


def _service(ctx: click.Context, quiet: bool = False) -> Service:
    opts = ctx.find_root().params
    settings = Settings.resolve(opts.get("store"), opts.get("index"))
    show = not quiet and (opts.get("verbose") or sys.stderr.isatty())
    return Service(settings, progress=_progress if show else None)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def duration(text: str) -> float:
    """Seconds from ``90``, ``30s``, ``10m``, ``2h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise BadInput(f"{text!r} is not a duration; use e.g. 90, 30s, 10m, 2h or 7d") from None
    if value < 0:
        raise BadInput(f"{text!r} is negative; durations are 0 or more")
    return value * units[unit]


class EnvfsGroup(click.Group):
    """Turns EnvfsError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnvfsError as exc:
            click.echo(f"envfs: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("envfs: interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise  # anything else is a bug: keep its traceback
            click.echo(
                f"envfs: error: {exc.strerror}: free space on the store "
                "(`envfs gc`, `envfs du`) and run the command again",
                err=True,
            )
            ctx.exit(EnvironmentProblem.exit_code)


#: The store is full (or over quota): an operator's problem, told in one line.
_FULL = (errno.ENOSPC, errno.EDQUOT)


@click.group(cls=EnvfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    envvar="ENVFS_STORE",
    help="Store directory (shared; default $XDG_DATA_HOME/envfs/store).",
)
@click.option(
    "--index",
    type=click.Path(path_type=Path),
    envvar="ENVFS_INDEX",
    help="Node-local LMDB index directory (default under $XDG_CACHE_HOME/envfs).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Report progress on stderr even when it is not a terminal.",
)
@click.version_option(package_name="envfs")
def main(store: Path | None, index: Path | None, verbose: bool) -> None:
    """envfs: ready Python environments at a fixed path.

    Build an env from packages, a requirements file or a uv project, bind it to
    WORKFLOW/NODE, and run it from the mount: /envs/WORKFLOW/NODE/bin/python.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 not found,
    5 build failed, 6 interpreter not found, 7 busy, 8 environment problem,
    9 interpreter capture failed.
    """
    import logging

    logging.basicConfig(format="envfs: warning: %(message)s", level=logging.WARNING)


def run() -> None:  # pragma: no cover - console entry for `python -m envfs`
    main(prog_name="envfs")
