"""The admin CLI (click). Every error is one line on stderr and a documented exit code
(see envfs/core/errors.py and docs/operations.md)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from envfs.core.config import Settings
from envfs.core.errors import BadInput, EnvfsError, EnvironmentProblem, NotFound
from envfs.core.names import parse_revision, parse_target
from envfs.service.envs import Inputs, Service

if TYPE_CHECKING:
    from envfs.node.cache import NodeCache

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
    info = svc.show(wf, node)
    if as_json:
        _emit(info.model_dump())
    else:
        click.echo(f"{wf}/{node}@{rev.revision} -> {rev.snapshot_id[:12]} ({info.state})")


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
@click.argument("target", metavar="WF/NODE")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def bind(ctx: click.Context, /, target: str, reason: str, as_json: bool, **spec: Any) -> None:
    """Bind WF/NODE to an env without building it.

    The env is built on first access through the mount (or by `envfs build`).
    """
    _bind_command(ctx, target, _inputs(ctx, spec), reason, as_json, build=False)


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
@click.option(
    "--packages",
    is_flag=True,
    help="Also list the packages installed (before the build: those locked).",
)
@click.pass_context
def show(ctx: click.Context, target: str, as_json: bool, packages: bool) -> None:
    """Show a binding: revision, snapshot id, state, snapshot path, python."""
    name, _, rev = target.partition("@")
    wf, node = parse_target(name)
    revision = _revision(rev) if rev else None
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


def _revision(text: str) -> int:
    revision = parse_revision(text)
    if revision is None:
        raise BadInput(f"revision {text!r} is not a number; see `envfs history`")
    return revision


def _mount_of(svc: Service, mount: Path | None) -> Path:
    """Where this node serves ``svc``'s store: ``mount``, else the mount of a live daemon
    of this store (from the daemons' status files)."""
    from envfs.fs.mount import live_mount_of, mount_type

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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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


def _duration(text: str) -> float:
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def gc_cmd(
    ctx: click.Context, dry_run: bool, keep: int, min_age: str, quarantine: str, as_json: bool
) -> None:
    """Sweep snapshots nothing needs into trash/, delete old trash, prune the pools.

    Kept: each binding's current revision and its last --keep ones, snapshots younger than
    --min-age, snapshots a node serves (its daemon's leases/<id>/<host>), and every captured
    interpreter. Staging dirs and build leases of crashed builds are removed too.
    Builds and binds wait while a sweep runs (and the reverse).
    """  # fmt: skip
    report = _service(ctx).gc(keep, _duration(min_age), _duration(quarantine), dry_run)
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


@main.command(name="rm")
@click.argument("target", metavar="WF/NODE")
@click.pass_context
def rm_cmd(ctx: click.Context, target: str) -> None:
    """Remove a binding (its revisions go to trash/); `gc` then sweeps what it used."""
    wf, node = parse_target(target)
    count = _service(ctx).remove(wf, node)
    click.echo(f"removed {wf}/{node} ({count} revision(s) moved to trash/)")


@main.group()
def python() -> None:
    """Interpreters captured into the store.

    envfs serves each env as a complete prefix: a CPython captured into the store once
    (relocatable, with the shared libraries it needs beyond glibc, libgcc_s, libstdc++
    and libz) plus the env's packages. A compute node needs only the mount.
    `build`/`bind --python` capture on first use; `python add` does it ahead of time.
    """


@python.command(name="add")
@click.argument("request", metavar="VERSION|PATH")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def python_add(ctx: click.Context, request: str, as_json: bool) -> None:
    """Capture a local CPython into the store (once; a no-op if it is there).

    VERSION is found on this node (pyenv versions, PATH), e.g. 3.12 or 3.12.1; PATH is an
    interpreter executable of any prefix. Exit 9 if it cannot be made self-contained (a
    library it needs is missing); nothing half-captured stays in the store.
    """
    info = _service(ctx).add_interpreter(request)
    if as_json:
        _emit(info.model_dump(exclude={"files"}))
        return
    click.echo(
        f"Python {info.version} ({info.platform}) -> {info.digest[:12]}: {info.file_count} "
        f"files, {_human(info.total_bytes)}, {len(info.libraries)} libraries bundled"
    )


@python.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def python_ls(ctx: click.Context, as_json: bool) -> None:
    """List captured interpreters: version, ABI, platform, digest, size, envs using them."""
    rows = _service(ctx, quiet=True).list_interpreters()
    if as_json:
        _emit([r.model_dump() for r in rows])
        return
    if not rows:
        click.echo("no interpreters captured yet (`envfs python add 3.12`)")
    for r in rows:
        click.echo(
            f"{r.digest[:12]}\tpython {r.version}\t{r.abi}\t{r.platform}\t"
            f"{_human(r.total_bytes)}\t{len(r.envs)} env(s)"
            + (f": {', '.join(r.envs[:5])}" + (" ..." if len(r.envs) > 5 else "") if r.envs else "")
        )


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


def _status_file(mountpoint: Path) -> Path:
    import hashlib

    from envfs.core.config import runtime_dir

    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / "mounts" / f"{key}.json"


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path), default=Path("/envs"))
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process (logs to stderr).")
@click.option(
    "--allow-other", is_flag=True, help="Let other users use the mount (default when run as root)."
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    help="Where a background daemon logs (default next to its status file).",
)
@click.option(
    "--kernel-mounts/--no-kernel-mounts",
    default=True,
    show_default=True,
    help="Hand each pinned view of a built env (WF/NODE@REV, .snapshots/ID) to the kernel as "
    "a read-only bind mount, so its files are served with no daemon round trip. Needs "
    "CAP_SYS_ADMIN; without it FUSE serves everything.",
)
@click.option(
    "--cache",
    "cache_dir",
    default="auto",
    show_default=True,
    help="Where this node keeps a local copy of every env it serves (served from there, "
    "so a NAS outage does not stop them): a directory, `off`, or `auto` (INDEX/cache when "
    "the store is not on a local disk, off when it is).",
)
@click.option(
    "--cache-size",
    default="50G",
    show_default=True,
    help="Bound of the node cache (K, M, G, T); least recently used envs not in use go first.",
)
@click.pass_context
def mount(
    ctx: click.Context,
    mountpoint: Path,
    foreground: bool,
    allow_other: bool,
    log_file: Path | None,
    kernel_mounts: bool,
    cache_dir: str,
    cache_size: str,
) -> None:
    """Mount the envs filesystem at MOUNTPOINT (default /envs).

    MOUNTPOINT/WF/NODE/bin/python runs the current revision of a binding,
    MOUNTPOINT/WF/NODE@REV/ a pinned revision, MOUNTPOINT/.snapshots/ID/ a snapshot.
    An env that is bound but not built is built on first access. SIGTERM unmounts.
    A stale mount left by a killed daemon is cleaned first.
    """
    mountpoint = mountpoint.absolute()
    max_bytes = _size(cache_size)  # bad input fails before anything else
    status = _status_file(mountpoint)
    if foreground:
        import logging

        from envfs.fs.mount import run_daemon
        from envfs.service.envs import StoreCatalog

        logging.getLogger().handlers.clear()
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s envfs[%(process)d] %(levelname)s %(message)s"
        )
        mountpoint.mkdir(parents=True, exist_ok=True)
        status.parent.mkdir(parents=True, exist_ok=True)
        svc = _service(ctx, quiet=True)
        catalog = StoreCatalog(svc)
        run_daemon(
            catalog,
            mountpoint,
            allow_other=allow_other or os.geteuid() == 0,
            foreground=True,
            status_path=status,
            kernel_mounts=kernel_mounts,
            cache=_node_cache(svc, cache_dir, max_bytes),
            served_path=svc.settings.index / "served.json",
            store=svc.store.root.resolve(),
        )
        return
    from envfs.fs.mount import is_stale_mount

    if os.path.ismount(mountpoint) and not is_stale_mount(mountpoint):
        raise EnvironmentProblem(
            f"{mountpoint} is already a mount point: run `envfs umount {mountpoint}` first"
        )
    _service(ctx, quiet=True).require_store()  # fail here, not in a detached daemon
    log = log_file or status.with_suffix(".log")
    extra = [] if kernel_mounts else ["--no-kernel-mounts"]
    extra += ["--cache", cache_dir, "--cache-size", cache_size]
    _spawn_daemon(ctx, mountpoint, allow_other, extra, log)


def _node_cache(svc: Service, where: str, max_bytes: int) -> NodeCache | None:
    """The node cache `mount --cache` asks for (see its help)."""
    from envfs.fs.nowait import blocking_is_cheap
    from envfs.node.cache import NodeCache

    if where == "off":
        return None
    if where == "auto":
        if blocking_is_cheap(os.fsencode(svc.store.root)):
            return None  # a store on a local disk is its own node-local copy
        return NodeCache(svc.settings.index / "cache", max_bytes)
    return NodeCache(Path(where).absolute(), max_bytes)


def _size(text: str) -> int:
    """Bytes of a size such as ``500M`` or ``20G`` (a plain number is bytes)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise BadInput(f"bad size {text!r}: use a number with K, M, G or T (e.g. 20G)") from None
    if value <= 0:
        raise BadInput(f"bad size {text!r}: must be more than 0")
    return int(value)


def _spawn_daemon(
    ctx: click.Context, mountpoint: Path, allow_other: bool, extra: list[str], log: Path
) -> None:
    """Start `envfs mount --foreground` detached, and return once it serves."""
    import subprocess
    import time

    from envfs.fs.mount import is_stale_mount

    opts = ctx.find_root().params
    cmd = [sys.executable, "-m", "envfs"]
    if opts.get("store"):
        cmd += ["--store", str(opts["store"])]
    if opts.get("index"):
        cmd += ["--index", str(opts["index"])]
    cmd += ["mount", str(mountpoint), "--foreground"] + (["--allow-other"] if allow_other else [])
    cmd += extra
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise EnvironmentProblem(f"the daemon exited ({proc.returncode}): {tail[0]}")
        if os.path.ismount(mountpoint) and not is_stale_mount(mountpoint):
            click.echo(f"envfs mounted at {mountpoint} (pid {proc.pid}, log {log})")
            return
        time.sleep(0.1)
    proc.terminate()
    raise EnvironmentProblem(f"the daemon did not mount {mountpoint} in 30 s; see {log}")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path), default=Path("/envs"))
@click.option(
    "--lazy",
    is_flag=True,
    help="Detach the mount even while processes use it (they then fail on their next read).",
)
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT; its daemon exits.

    Refused (exit 7, naming the processes) while processes run from the mount or hold
    files of it, unless --lazy.
    """
    import time

    from envfs.core.errors import Busy
    from envfs.fs.mount import (
        check_may_unmount,
        daemon_alive,
        mount_type,
        read_status,
        unmount,
        users_of,
    )

    mountpoint = mountpoint.absolute()
    if not os.path.ismount(mountpoint):
        raise NotFound(f"{mountpoint} is not mounted")
    check_may_unmount(mountpoint)
    data = read_status(_status_file(mountpoint))
    alive = data is not None and data.mountpoint == str(mountpoint) and daemon_alive(data)
    if not lazy and mount_type(mountpoint) == "fuse.envfs":
        users = users_of(mountpoint, ignore={os.getpid(), *([data.pid] if data else [])})
        if users:
            shown = ", ".join(map(str, users[:10])) + (" ..." if len(users) > 10 else "")
            raise Busy(
                f"{mountpoint} is in use by {len(users)} process(es) (pid {shown}); stop "
                "them first, or `envfs umount --lazy` to detach it anyway"
            )
    deadline = time.monotonic() + 10
    if alive and data is not None and mount_type(mountpoint) == "fuse.envfs":
        # the daemon unmounts itself: its kernel-served views first, while it still answers
        os.kill(data.pid, signal.SIGTERM)
        while os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
    if os.path.ismount(mountpoint):
        unmount(mountpoint)
    while data is not None and daemon_alive(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    click.echo(f"unmounted {mountpoint}")


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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Mounts on this node: envs served, builds running and failed, cache statistics."""
    import time

    from envfs.core.config import runtime_dir
    from envfs.fs.mount import daemon_alive, read_status

    mounts = []
    for path in sorted((runtime_dir() / "mounts").glob("*.json")):
        data = read_status(path)
        if data is not None:
            mounts.append(data.model_copy(update={"alive": daemon_alive(data)}))
    if as_json:
        _emit({"mounts": [m.model_dump() for m in mounts]})
        return
    if not mounts:
        click.echo("no envfs mounts on this node")
    for m in mounts:
        state = "serving" if m.alive else "DEAD (run `envfs mount` again to clean up)"
        click.echo(f"{m.mountpoint}: pid {m.pid} {state}, since {m.started}")
        kernel = sum(e.kernel for e in m.envs)
        click.echo(f"  envs served: {len(m.envs)} ({kernel} by the kernel, the rest by FUSE)")
        for env in m.envs[:20]:
            how = "kernel" if env.kernel else "fuse"
            click.echo(f"    {env.path} -> {env.snapshot_id[:12]} ({how})")
        if len(m.envs) > 20:
            click.echo(f"    ... and {len(m.envs) - 20} more (--json lists all)")
        b = m.builds
        click.echo(
            f"  builds: {len(b.running)} running, {len(b.failed)} failed, {b.completed} done"
        )
        views: dict[str, list[str]] = {}
        for e in m.envs:
            views.setdefault(e.snapshot_id, []).append(e.path)

        def named(sid: str, views: dict[str, list[str]] = views) -> str:
            where = ", ".join(sorted(views.get(sid, []))[:3])
            return f"{sid[:12]}" + (f" ({where})" if where else "")

        for r in b.running:
            click.echo(f"    building {named(r.snapshot_id)} for {time.time() - r.since:.0f}s")
        for f in b.failed:
            click.echo(f"    failed {named(f.snapshot_id)}: {f.reason}")
        hits, cold = m.cache.get("hits", 0), m.cache.get("cold", 0)
        click.echo(
            f"  cache: {m.cache.get('inodes', 0)} inodes, {hits} lookups from memory, {cold} cold"
        )
        if "node_cache_copies" in m.cache:
            click.echo(f"  node cache: {m.cache['node_cache_copies']} env(s) served from it")


@main.command(name="serve-api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8321, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="ENVFS_API_TOKEN_FILE",
    help="File holding the bearer token every mutation needs [env: ENVFS_API_TOKEN_FILE].",
)
@click.option(
    "--mount-path",
    type=click.Path(path_type=Path),
    help="The path engines see the envs at (default: this store's mount here, else /envs).",
)
@click.option(
    "--audit-dsn",
    envvar="ENVFS_AUDIT_DSN",
    metavar="DSN",
    help="Also write every mutation to PostgreSQL (postgresql://...); rows wait in "
    "<index>/audit-spool while it is down [env: ENVFS_AUDIT_DSN].",
)
@click.pass_context
def serve_api(
    ctx: click.Context,
    host: str,
    port: int,
    token_file: Path | None,
    mount_path: Path | None,
    audit_dsn: str | None,
) -> None:
    """Serve the HTTP API for workflow platforms (docs/api.md).

    POST /envs binds (and builds in the background), GET /envs/WF/NODE says where the env
    is and its state; /openapi.json documents every route, /metrics is Prometheus text.
    Mutations need `Authorization: Bearer TOKEN` (the first line of --token-file).
    """
    from envfs.api.server import create_app, serve

    if token_file is None:
        raise BadInput("serve-api needs --token-file (mutations need a bearer token)")
    token = _read_token(token_file)
    svc = _service(ctx, quiet=True)
    audit = None
    if audit_dsn:
        from envfs.api.audit import PgAudit

        audit = PgAudit(audit_dsn, svc.settings.index / "audit-spool")
    click.echo(f"envfs: serving the API on http://{host}:{port} (store {svc.store.root})", err=True)
    serve(create_app(svc, token, mount_path, audit), host, port)


def _read_token(path: Path) -> str:
    """The bearer token: the first line of ``path``, printable ASCII, at least 8 characters.
    A token file other users can read is made private (0600) when it is ours, and refused
    when it is not: a token anyone on the host can read guards nothing."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.fchmod(f.fileno(), 0o600)
                _progress(f"warning: {path} was readable by other users; made it 0600")
            elif st.st_mode & 0o077:
                raise BadInput(
                    f"{path} is readable by other users and not ours to fix; chmod 600 it"
                )
            token = f.read().decode("ascii").strip().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "no ASCII token on its first line"
        raise BadInput(f"cannot read a token from {path}: {why}") from None
    if len(token) < 8 or not token.isprintable():
        raise BadInput(f"the token in {path} is shorter than 8 printable characters")
    return token


def run() -> None:  # pragma: no cover - console entry for `python -m envfs`
    main(prog_name="envfs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
