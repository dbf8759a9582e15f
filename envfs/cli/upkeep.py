"""Store upkeep: du, verify, gc, index rebuild."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from envfs.cli.app import _emit, _human, _service, duration, main
from envfs.core.errors import BadInput

if TYPE_CHECKING:
    pass


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def du(ctx: click.Context, as_json: bool) -> None:
    """Disk used by snapshots: real bytes, each hardlinked file counted once.

    real_bytes sums file sizes of distinct inodes; apparent_bytes counts every env as a copy.
    """
    usage = _service(ctx, quiet=True).disk_usage()
    if as_json:
        _emit(usage.model_dump())
        return
    click.echo(
        f"{usage.snapshots} snapshots: {_human(usage.real_bytes)} real "
        f"({_human(usage.disk_bytes)} in blocks, {_human(usage.apparent_bytes)} if every env "
        f"were a copy); uv cache adds {_human(usage.uv_cache_extra_bytes)}"
    )


@main.command()
@click.argument("target", metavar="[WF/NODE|SNAPSHOT_ID]", required=False)
@click.option("--all", "check_all", is_flag=True, help="Everything (the default without TARGET).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def verify(ctx: click.Context, target: str | None, check_all: bool, as_json: bool) -> None:
    """Check snapshots against their manifests; exit 5 naming what is damaged.

    Without TARGET (or with --all): every snapshot (one unreadable manifest does not stop
    the others), bindings whose built snapshot is gone, revision files that cannot be read,
    and uv's cache against the wheels' RECORDs. With WF/NODE or a snapshot id (prefix):
    that snapshot only.
    """
    if check_all and target is not None:
        raise BadInput("give either --all or a TARGET, not both")
    report = _service(ctx).verify(target)
    if as_json:
        _emit(report.model_dump())
    else:
        for sid, problems in report.damaged.items():
            click.echo(f"{sid[:12]}: {len(problems)} problem(s)")
            for problem in problems[:20]:
                click.echo(f"  {problem}")
            if len(problems) > 20:
                click.echo(f"  ... and {len(problems) - 20} more (--json lists all)")
        for line in report.gone + report.corrupt:
            click.echo(line)
        for problem in report.uv_cache[:20]:
            click.echo(f"uv-cache: {problem}")
        cache = f", {report.uv_cache_checked} uv cache file(s)" if target is None else ""
        click.echo(
            f"{report.checked} snapshot(s){cache} checked: {len(report.damaged)} damaged"
            + (f", {len(report.gone)} gone" if report.gone else "")
            + (f", {len(report.corrupt)} corrupt record(s)" if report.corrupt else "")
            + (f", {len(report.uv_cache)} uv cache problem(s)" if report.uv_cache else "")
        )
    if not report.ok:
        ctx.exit(5)


@main.command(name="gc")
@click.option("--dry-run", is_flag=True, help="Report what would be swept; change nothing.")
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Earlier revisions of each binding kept besides the current one.",
)
@click.option(
    "--min-age",
    default="1h",
    show_default=True,
    help="Keep snapshots built more recently than this (e.g. 0, 30m, 2h, 7d).",
)
@click.option(
    "--quarantine",
    default="1d",
    show_default=True,
    help="How long swept snapshots stay in trash/ before they are deleted.",
)
@click.option(
    "--walk",
    is_flag=True,
    help="Read every binding's revisions from its files, not from this node's index "
    "(for a store whose binding files were changed other than by envfs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def gc_cmd(
    ctx: click.Context,
    dry_run: bool,
    keep: int,
    min_age: str,
    quarantine: str,
    walk: bool,
    as_json: bool,
) -> None:
    """Sweep snapshots nothing needs into trash/, delete old trash, prune the pools.

    Kept: each binding's current revision and its last --keep ones, snapshots younger than
    --min-age, snapshots a node serves (its daemon's leases/<id>/<host>), and every captured
    interpreter. Staging dirs and build leases of crashed builds are removed too.
    Builds and binds wait while a sweep runs (and the reverse).

    Which revisions a binding has is read from this node's index, caught up with the
    store's logs, where it knows for certain (every envfs writer logs a change before
    making it); the binding's files are read for the others, or for all with --walk.
    """  # fmt: skip
    report = _service(ctx).gc(keep, duration(min_age), duration(quarantine), dry_run, walk)
    if as_json:
        _emit(report.model_dump())
        return
    verb = "would sweep" if dry_run else "swept"
    for sid in report.swept:
        click.echo(f"{verb} {sid[:12]}")
    leftovers = len(report.dead_builds) + len(report.stale_leases)
    if leftovers:
        what = "would remove" if dry_run else "removed"
        click.echo(
            f"{what} {len(report.dead_builds)} dead build dir(s) and "
            f"{len(report.stale_leases)} stale build lease(s) left by crashed builds"
        )
    click.echo(
        f"{verb} {len(report.swept)} snapshot(s), about {_human(report.freed_bytes)}; "
        f"kept {len(report.kept)}"
        + (
            ""
            if dry_run
            else f"; deleted {report.trash_deleted} from trash, {report.objects_deleted} pool "
            f"object(s), {report.links_deleted} bytecode link(s)"
        )
    )


@main.group()
def index() -> None:
    """The node-local LMDB index."""


@index.command()
@click.pass_context
def rebuild(ctx: click.Context) -> None:
    """Rebuild the index from the store: every binding file read and every snapshot's
    readiness checked (progress on a TTY or with -v). Safe while a daemon serves."""
    svc = _service(ctx)
    behind = svc.refresh_index(full=True)
    count = len(svc.index.all_bindings())
    click.echo(
        f"index rebuilt at {svc.settings.index}: {count} binding(s), {len(behind)} caught up"
    )


@index.command()
@click.pass_context
def refresh(ctx: click.Context) -> None:
    """Compare every binding file with the index now (a daemon does it slowly in the
    background) and tell every node's daemon about the bindings that were behind."""
    svc = _service(ctx)
    behind = svc.refresh_index()
    for wf, node in behind:
        click.echo(f"caught up {wf}/{node}")
    click.echo(f"index refreshed: {len(behind)} binding(s) were behind")


@index.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint's record as JSON.")
@click.pass_context
def checkpoint(ctx: click.Context, as_json: bool) -> None:
    """Write this node's index (caught up with the change feed first) into the store as its
    checkpoint: a fresh node's index then starts from it in one large read instead of
    reading every log line. A daemon writes one by itself once the logs have grown well
    past the last; this writes one now."""
    svc = _service(ctx)
    info = svc.write_checkpoint()
    if as_json:
        click.echo(info.model_dump_json(indent=2))
        return
    click.echo(
        f"checkpoint {info.file[:12]} written: {info.bindings} binding(s), "
        f"{info.size / 1e6:.1f} MB, as of {info.log_bytes / 1e6:.1f} MB of logs"
    )
