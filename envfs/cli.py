"""The admin CLI (click). Every error is one line on stderr and a documented exit code
(see envfs/errors.py and docs/operations.md)."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from envfs.config import Settings
from envfs.errors import EnvfsError
from envfs.names import parse_target
from envfs.service import Inputs, Service

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
    5 build failed, 6 interpreter not found, 7 busy, 8 environment problem.
    """
    import logging

    logging.basicConfig(format="envfs: warning: %(message)s", level=logging.WARNING)


def spec_options(f: F) -> F:
    f = click.argument("packages", nargs=-1)(f)
    f = click.option(
        "-r",
        "--requirements",
        "requirements_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read requirements from FILE (one per line).",
    )(f)
    f = click.option(
        "--project",
        type=click.Path(path_type=Path, file_okay=False),
        help="A uv project dir (pyproject.toml + uv.lock), built as locked.",
    )(f)
    f = click.option(
        "--python",
        "python",
        metavar="VERSION",
        help="Interpreter: 3.12, 3.12.1 or a path (found on this node).",
    )(f)
    f = click.option(
        "--upgrade",
        is_flag=True,
        help="Re-resolve a requirement list instead of reusing its earlier lock.",
    )(f)
    f = click.option("--reason", default="", help="Why (kept in the binding's history).")(f)
    return f


def _inputs(
    packages: tuple[str, ...],
    requirements_file: Path | None,
    project: Path | None,
    python: str | None,
    upgrade: bool,
) -> Inputs:
    return Inputs(
        packages=packages,
        requirements_file=requirements_file,
        project=project,
        python=python,
        upgrade=upgrade,
    )


@main.command()
@click.argument("target", metavar="WF/NODE")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def build(
    ctx: click.Context,
    target: str,
    packages: tuple[str, ...],
    requirements_file: Path | None,
    project: Path | None,
    python: str | None,
    upgrade: bool,
    reason: str,
    as_json: bool,
) -> None:
    """Build an env now and bind it to WF/NODE.

    A spec that was built before (same lock, same interpreter) is reused at once.
    """
    wf, node = parse_target(target)
    svc = _service(ctx)
    resolved = svc.resolve(_inputs(packages, requirements_file, project, python, upgrade))
    svc.ensure_built(resolved.snapshot_id)
    rev = svc.bind(wf, node, resolved.snapshot_id, reason)
    info = svc.show(wf, node)
    if as_json:
        _emit(info.model_dump())
    else:
        click.echo(f"{wf}/{node}@{rev.revision} -> {resolved.snapshot_id[:12]} ({info.state})")


@main.command()
@click.argument("target", metavar="WF/NODE")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def bind(
    ctx: click.Context,
    target: str,
    packages: tuple[str, ...],
    requirements_file: Path | None,
    project: Path | None,
    python: str | None,
    upgrade: bool,
    reason: str,
    as_json: bool,
) -> None:
    """Bind WF/NODE to an env without building it.

    The env is built on first access through the mount (or by `envfs build`).
    """
    wf, node = parse_target(target)
    svc = _service(ctx)
    resolved = svc.resolve(_inputs(packages, requirements_file, project, python, upgrade))
    rev = svc.bind(wf, node, resolved.snapshot_id, reason)
    info = svc.show(wf, node)
    if as_json:
        _emit(info.model_dump())
    else:
        click.echo(f"{wf}/{node}@{rev.revision} -> {resolved.snapshot_id[:12]} ({info.state})")


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List bindings with their current snapshot and state."""
    envs = _service(ctx).list_envs()
    if as_json:
        _emit([e.model_dump() for e in envs])
        return
    for e in envs:
        click.echo(
            f"{e.workflow}/{e.node}@{e.revision}\t{e.snapshot_id[:12]}\t{e.state}"
            f"\tpython {e.python}"
        )


@main.command()
@click.argument("target", metavar="WF/NODE[@REV]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx: click.Context, target: str, as_json: bool) -> None:
    """Show a binding: revision, snapshot id, state, snapshot path, python."""
    name, _, rev = target.partition("@")
    wf, node = parse_target(name)
    revision = _revision(rev) if rev else None
    info = _service(ctx).show(wf, node, revision)
    if as_json:
        _emit(info.model_dump())
        return
    for key, value in info.model_dump().items():
        if value is not None:
            click.echo(f"{key}: {value}")


def _revision(text: str) -> int:
    if not text.isdigit():
        from envfs.errors import BadInput

        raise BadInput(f"revision {text!r} is not a number; see `envfs history`")
    return int(text)


@main.command()
@click.argument("target", metavar="WF/NODE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def history(ctx: click.Context, target: str, as_json: bool) -> None:
    """List every revision of a binding, oldest first."""
    wf, node = parse_target(target)
    revisions = _service(ctx).revisions(wf, node)
    if as_json:
        _emit([r.model_dump() for r in revisions])
        return
    import time

    for r in revisions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
        extra = f" (rollback to {r.rollback_to})" if r.action == "rollback" else ""
        click.echo(f"{r.revision}\t{r.snapshot_id[:12]}\t{when}\t{r.user}@{r.host}{extra}")


@main.command()
@click.argument("target", metavar="WF/NODE")
@click.option("--to", "to", type=int, help="Revision to return to (default: the previous one).")
@click.pass_context
def rollback(ctx: click.Context, target: str, to: int | None) -> None:
    """Point WF/NODE back at an earlier revision's snapshot (appends a revision)."""
    wf, node = parse_target(target)
    rev = _service(ctx).rollback(wf, node, to)
    click.echo(
        f"{wf}/{node}@{rev.revision} -> {rev.snapshot_id[:12]} "
        f"(rolled back to revision {rev.rollback_to})"
    )


def _walk_files(root: Path) -> Iterator[os.stat_result]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                yield st


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def du(ctx: click.Context, as_json: bool) -> None:
    """Disk used by snapshots: real bytes, each hardlinked file counted once.

    real_bytes sums file sizes of distinct inodes; apparent_bytes counts every env as a copy.
    """
    svc = _service(ctx, quiet=True)
    svc.store.ensure()
    seen: set[tuple[int, int]] = set()
    per: dict[str, dict[str, int]] = {}
    real = disk = 0
    for sid in svc.store.snapshot_ids():
        apparent = new = 0
        for st in _walk_files(svc.store.snapshot_dir(sid)):
            apparent += st.st_size
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                new += st.st_size
                disk += st.st_blocks * 512
        real += new
        per[sid] = {"apparent_bytes": apparent, "new_bytes": new}
    cache_extra = sum(
        st.st_size for st in _walk_files(svc.store.uv_cache) if (st.st_dev, st.st_ino) not in seen
    )
    apparent_total = sum(p["apparent_bytes"] for p in per.values())
    result = {
        "snapshots": len(per),
        "real_bytes": real,
        "disk_bytes": disk,
        "apparent_bytes": apparent_total,
        "uv_cache_extra_bytes": cache_extra,
        "per_snapshot": per,
    }
    if as_json:
        _emit(result)
        return
    click.echo(
        f"{len(per)} snapshots: {_human(real)} real ({_human(disk)} in blocks, "
        f"{_human(apparent_total)} if every env were a copy); uv cache adds {_human(cache_extra)}"
    )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@main.command()
@click.argument("target", metavar="WF/NODE|SNAPSHOT_ID", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def verify(ctx: click.Context, target: str | None, as_json: bool) -> None:
    """Check snapshots against their manifests (all, one binding's, or one id)."""
    from envfs.builder import verify_tree

    svc = _service(ctx, quiet=True)
    svc.store.ensure()
    if target is None:
        ids = svc.store.snapshot_ids()
    elif "/" in target:
        ids = [svc.show(*parse_target(target)).snapshot_id]
    else:
        ids = [i for i in svc.store.snapshot_ids() if i.startswith(target)] or [target]
    report = {}
    for sid in ids:
        manifest = svc.store.read_manifest(sid)
        report[sid] = verify_tree(svc.store.snapshot_dir(sid), manifest)
    bad = {k: v for k, v in report.items() if v}
    if as_json:
        _emit({"checked": len(report), "damaged": bad})
    else:
        for sid, problems in bad.items():
            click.echo(f"{sid[:12]}: {len(problems)} problem(s): {'; '.join(problems[:5])}")
        click.echo(f"{len(report)} snapshot(s) checked, {len(bad)} damaged")
    if bad:
        ctx.exit(5)


@main.group()
def index() -> None:
    """The node-local LMDB index."""


@index.command()
@click.pass_context
def rebuild(ctx: click.Context) -> None:
    """Rebuild the index from the store."""
    svc = _service(ctx)
    count = svc.index.rebuild()
    click.echo(f"index rebuilt at {svc.settings.index}: {count} binding(s)")


def run() -> None:  # pragma: no cover - console entry for `python -m envfs`
    main(prog_name="envfs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
