"""envfs doctor: what this node lacks for envfs, each with a fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from envfs.cli.app import _emit, _service, main
from envfs.core.errors import EnvironmentProblem

if TYPE_CHECKING:
    pass


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this node: FUSE, uv, interpreters, store, hardlinks, index, mounts.

    Each finding is ok, warn or error, with a fix. Exits 8 if anything is an error.
    """
    from envfs.service.doctor import diagnose

    report = diagnose(_service(ctx, quiet=True).settings)
    if as_json:
        _emit(report.model_dump())
    else:
        for f in report.findings:
            level = f.level.upper() if f.level == "error" else f.level
            click.echo(f"{level:5s} {f.name}: {f.detail}")
            if f.hint:
                click.echo(f"      fix: {f.hint}")
    if not report.ok:
        ctx.exit(EnvironmentProblem.exit_code)
