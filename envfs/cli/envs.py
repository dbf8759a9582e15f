"""Commands on environments and bindings: build, bind, ls, show, history, rollback, rm,
diff, resolve, run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from envfs.cli.app import F, _emit, _service, main
from envfs.core.errors import BadInput, NotFound
from envfs.core.names import parse_pinned, parse_target, validate_name
from envfs.service.envs import Inputs, Service

if TYPE_CHECKING:
    pass


def spec_options(f: F) -> F:
    """The inputs of a spec, shared by `build` and `bind` (they become ``Inputs`` fields)."""
    options = [
        click.argument("packages", nargs=-1),
        click.option("-r", "--requirements", "requirements_file",
                     type=click.Path(path_type=Path, dir_okay=False),
                     help="Read requirements from FILE (one per line)."),
        click.option("--project", type=click.Path(path_type=Path, file_okay=False),
                     help="A uv project dir (pyproject.toml + uv.lock), built as locked."),
        click.option("--python", "python", metavar="VERSION",
                     help="Interpreter: 3.12, 3.12.1 or a path (captured into the store)."),
        click.option("--upgrade", is_flag=True,
                     help="Re-resolve a requirement list instead of reusing its earlier lock."),
        click.option("--allow-local", is_flag=True,
                     help="Accept requirements naming local paths (pkg @ file:///dir)."),
        click.option("--index-url", metavar="URL", envvar=["UV_DEFAULT_INDEX", "UV_INDEX_URL"],
                     help="Package index instead of PyPI, for requirement lists "
                          "[env: UV_DEFAULT_INDEX, UV_INDEX_URL]. Credentials in the URL are "
                          "used, never stored."),
        click.option("--extra-index-url", "extra_index_urls", metavar="URL", multiple=True,
                     envvar=["UV_INDEX", "UV_EXTRA_INDEX_URL"],
                     help="Another index, asked before the default one (repeatable) "
                          "[env: UV_INDEX, UV_EXTRA_INDEX_URL]."),
        click.option("--extra", "extras", metavar="NAME", multiple=True,
                     help="With --project: install this extra too (repeatable)."),
        click.option("--group", "groups", metavar="NAME", multiple=True,
                     help="With --project: install this dependency group too (repeatable)."),
        click.option("--no-dev", is_flag=True,
                     help="With --project: leave out the dev group (installed by default, "
                          "as `uv sync` does)."),
        click.option("--ray-driver", metavar="PYTHON",
                     help="For Ray workers (py_executable): add the ray==X that the driver's "
                          "interpreter PYTHON imports, and use its Python version."),
        click.option("--install-project", is_flag=True,
                     help="With --project: install the project itself, built into a wheel "
                          "now (not editable: the env never reads the project dir)."),
        click.option("--build-policy", type=click.Choice(["sandboxed", "wheels-only"]),
                     help="sandboxed: a package with no wheel for this Python is built from "
                          "source as an unprivileged user that can write nothing but its "
                          "scratch dir; wheels-only: refuse such a spec (no build code runs). "
                          "Default: the store's build_policy in envfs.toml (sandboxed)."),
        click.option("--reason", default="", help="Why (kept in the binding's history)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _inputs(ctx: click.Context, spec: dict[str, Any]) -> Inputs:
    """The spec options as ``Inputs``. A project's indexes are its own: index variables in
    the environment apply to requirement lists only (on the command line, they are refused)."""
    if spec.get("project") is not None:
        for name, empty in (("index_url", None), ("extra_index_urls", ())):
            if ctx.get_parameter_source(name) is click.core.ParameterSource.ENVIRONMENT:
                spec[name] = empty
    return Inputs(**spec)


def _bind_command(
    ctx: click.Context, target: str, inputs: Inputs, reason: str, as_json: bool, build: bool
) -> None:
    """`build` and `bind`: resolve the spec, build it now or not, append a revision."""
    wf, node = parse_target(target)
    svc = _service(ctx)
    rev, _reused = svc.bind_inputs(wf, node, inputs, reason, build)
    _report_bind(svc, wf, node, rev.revision, rev.snapshot_id, as_json)


def _report_bind(
    svc: Service, wf: str, node: str, revision: int, snapshot_id: str, as_json: bool
) -> None:
    info = svc.show(wf, node)
    if as_json:
        _emit(info.model_dump())
    else:
        click.echo(f"{wf}/{node}@{revision} -> {snapshot_id[:12]} ({info.state})")


@main.command()
@click.argument("target", metavar="WF/NODE")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def build(ctx: click.Context, /, target: str, reason: str, as_json: bool, **spec: Any) -> None:
    """Build an env now and bind it to WF/NODE.

    A spec that was built before (same lock, same interpreter) is reused at once.
    """
    _bind_command(ctx, target, _inputs(ctx, spec), reason, as_json, build=True)


@main.command()
@click.argument("target", metavar="WF/NODE", required=False)
@spec_options
@click.option(
    "--snapshot",
    "snapshot_ref",
    metavar="ID",
    help="Bind to a snapshot the store has (built or bound), by id or unique prefix.",
)
@click.option(
    "--batch",
    type=click.File("r"),
    metavar="FILE",
    help="Bind many: one 'WF/NODE SNAPSHOT_ID' per line ('-': stdin), each line all or "
    "nothing; prints a summary, exit 3 if any line failed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def bind(
    ctx: click.Context,
    /,
    target: str | None,
    reason: str,
    snapshot_ref: str | None,
    batch: IO[str] | None,
    as_json: bool,
    **spec: Any,
) -> None:
    """Bind WF/NODE to an env without building it.

    The env is built on first access through the mount (or by `envfs build`).
    With --snapshot, WF/NODE is bound to an env the store already has; with --batch,
    many bindings at once (each a revision as usual).
    """
    # given on the command line (UV_INDEX & co. apply to specs only; defaults are not given)
    implied = (click.core.ParameterSource.ENVIRONMENT, click.core.ParameterSource.DEFAULT)
    given = [
        k.replace("_", "-")
        for k, v in spec.items()
        if v not in (None, False, ()) and ctx.get_parameter_source(k) not in implied
    ]
    if batch is not None:
        if target is not None or snapshot_ref is not None or given:
            raise click.UsageError("--batch takes no WF/NODE, --snapshot or spec options")
        _bind_batch(ctx, batch, reason, as_json)
        return
    if target is None:
        raise click.UsageError("missing WF/NODE (or --batch FILE)")
    if snapshot_ref is not None:
        if given:
            raise click.UsageError(f"--snapshot takes no spec ({', '.join(given)})")
        wf, node = parse_target(target)
        svc = _service(ctx)
        rev = svc.bind_snapshot(wf, node, snapshot_ref, reason)
        _report_bind(svc, wf, node, rev.revision, rev.snapshot_id, as_json)
        return
    _bind_command(ctx, target, _inputs(ctx, spec), reason, as_json, build=False)


def _bind_batch(ctx: click.Context, batch: IO[str], reason: str, as_json: bool) -> None:
    svc = _service(ctx)
    report = svc.bind_batch(batch, reason)
    if as_json:
        _emit(
            {
                "bound": report.bound,
                "unchanged": report.unchanged,
                "failed": [{"line": n, "error": why} for n, why in report.failed],
            }
        )
    else:
        for n, why in report.failed:
            click.echo(f"envfs: line {n}: {why}", err=True)
        click.echo(
            f"bound {report.bound}, unchanged {report.unchanged}, failed {len(report.failed)}"
        )
    if report.failed:
        ctx.exit(BadInput.exit_code)


@main.command(name="ls")
@click.option("--workflow", metavar="WF", help="Only the bindings of this workflow.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ls_cmd(ctx: click.Context, workflow: str | None, as_json: bool) -> None:
    """List bindings with their current snapshot and state (from this node's index)."""
    if workflow is not None:
        validate_name(workflow, "workflow")
    envs = _service(ctx).list_envs(workflow)
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
@click.option(
    "--packages",
    is_flag=True,
    help="Also list the packages installed (before the build: those locked).",
)
@click.pass_context
def show(ctx: click.Context, target: str, as_json: bool, packages: bool) -> None:
    """Show a binding: revision, snapshot id, state, snapshot path, python."""
    wf, node, revision = parse_pinned(target)
    svc = _service(ctx)
    info = svc.show(wf, node, revision)
    pkgs = svc.packages(info.snapshot_id) if packages else None
    if as_json:
        data: dict[str, Any] = info.model_dump()
        if pkgs is not None:
            data["packages"] = [{"name": n, "version": v} for n, v in pkgs]
        _emit(data)
        return
    for key, value in info.model_dump().items():
        if value is not None:
            click.echo(f"{key}: {value}")
    if pkgs is not None:
        click.echo(f"packages: {len(pkgs)}")
        for n, v in pkgs:
            click.echo(f"  {n}=={v}")


def _mount_of(svc: Service, mount: Path | None) -> Path:
    """Where this node serves ``svc``'s store: ``mount``, else the mount of a live daemon
    of this store (from the daemons' status files)."""
    from envfs.fs.mounted import live_mount_of, mount_type

    if mount is not None:
        if mount_type(mount.absolute()) != "fuse.envfs":
            raise NotFound(f"{mount} is not an envfs mount")
        return mount.absolute()
    found = live_mount_of(svc.store.root)
    if found is None:
        raise NotFound(
            f"no envfs mount of the store {svc.store.root.resolve()} on this node: "
            "run `envfs mount`, or pass --mount"
        )
    return found


_MOUNT_OPTION = click.option(
    "--mount",
    type=click.Path(path_type=Path),
    help="The envfs mount to use (default: the mount of this store on this node).",
)


@main.command()
@click.argument("target", metavar="WF/NODE")
@_MOUNT_OPTION
@click.option(
    "--ray-driver",
    metavar="PYTHON",
    help="Refuse (exit 3) an env whose ray or Python differs from this driver's.",
)
@click.pass_context
def resolve(ctx: click.Context, target: str, mount: Path | None, ray_driver: str | None) -> None:
    """Print the pinned path of WF/NODE's current revision under the mount (MNT/WF/NODE@REV).

    For launchers that need strict consistency: every process started from that path runs
    that revision, whatever binds come after.
    """
    from envfs.build import raydriver

    wf, node = parse_target(target)
    svc = _service(ctx)
    info = svc.show(wf, node)
    if ray_driver is not None:
        driver = raydriver.probe(ray_driver)
        why = raydriver.mismatch(svc.packages(info.snapshot_id), info.python, driver)
        if why is not None:
            raise BadInput(f"{wf}/{node}@{info.revision} {why}")
    click.echo(str(_mount_of(svc, mount) / wf / f"{node}@{info.revision}"))


@main.command(
    name="run",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("target", metavar="WF/NODE")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--pinned", is_flag=True, help="Run the revision current now (WF/NODE@REV).")
@_MOUNT_OPTION
@click.pass_context
def run_in_env(
    ctx: click.Context, target: str, command: tuple[str, ...], pinned: bool, mount: Path | None
) -> None:
    """Run COMMAND in WF/NODE's env: envfs run etl/prep -- python -m mytask.

    The env's bin/ comes first on PATH (so `python` is the env's) and VIRTUAL_ENV names the
    env; the command replaces this process. Without --pinned it runs from MNT/WF/NODE
    (the process pins itself to the revision current when it starts).
    """
    wf, node = parse_target(target)
    svc = _service(ctx)
    root = _mount_of(svc, mount) / wf / node
    if pinned:
        root = root.with_name(f"{node}@{svc.show(wf, node).revision}")
    env = dict(os.environ, VIRTUAL_ENV=str(root))
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise BadInput(f"cannot run {command[0]!r} in {wf}/{node}: {exc.strerror}") from exc


@main.command()
@click.argument("target", metavar="WF/NODE")
@click.argument("rev1", type=int)
@click.argument("rev2", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def diff(ctx: click.Context, target: str, rev1: int, rev2: int, as_json: bool) -> None:
    """What changed between two revisions of WF/NODE: packages added, removed, changed.

    Also says whether the Python changed. Exit 0 either way (like `git diff --stat`).
    """
    wf, node = parse_target(target)
    svc = _service(ctx)
    old, new = svc.show(wf, node, rev1), svc.show(wf, node, rev2)
    before, after = dict(svc.packages(old.snapshot_id)), dict(svc.packages(new.snapshot_id))
    added = {n: after[n] for n in sorted(after.keys() - before.keys())}
    removed = {n: before[n] for n in sorted(before.keys() - after.keys())}
    changed = {
        n: [before[n], after[n]]
        for n in sorted(before.keys() & after.keys())
        if before[n] != after[n]
    }
    if as_json:
        _emit(
            {
                "from": {"revision": rev1, "snapshot_id": old.snapshot_id, "python": old.python},
                "to": {"revision": rev2, "snapshot_id": new.snapshot_id, "python": new.python},
                "added": added,
                "removed": removed,
                "changed": changed,
            }
        )
        return
    click.echo(f"{wf}/{node}@{rev1} ({old.snapshot_id[:12]}) -> @{rev2} ({new.snapshot_id[:12]})")
    if old.python != new.python:
        click.echo(f"  python {old.python} -> {new.python}")
    for n, v in added.items():
        click.echo(f"+ {n}=={v}")
    for n, v in removed.items():
        click.echo(f"- {n}=={v}")
    for n, (a, b) in changed.items():
        click.echo(f"~ {n} {a} -> {b}")
    if not (added or removed or changed) and old.python == new.python:
        click.echo("  same packages")


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


@main.command(name="rm")
@click.argument("target", metavar="WF/NODE")
@click.pass_context
def rm_cmd(ctx: click.Context, target: str) -> None:
    """Remove a binding (its revisions go to trash/); `gc` then sweeps what it used."""
    wf, node = parse_target(target)
    count = _service(ctx).remove(wf, node)
    click.echo(f"removed {wf}/{node} ({count} revision(s) moved to trash/)")
