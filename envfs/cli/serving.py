"""Serving: mount, umount, status (the daemon) and serve-api (the HTTP API)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from envfs.cli.app import _emit, _service, duration, main
from envfs.core.errors import BadInput, EnvironmentProblem, NotFound
from envfs.service.envs import Service
from envfs.store.files import private_dir

if TYPE_CHECKING:
    from envfs.node.cache import NodeCache


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
    "--idle-release",
    default="10m",
    show_default=True,
    metavar="DUR",
    help="Let go of an env no process on this node has used for DUR (90, 30s, 10m, 2h): "
    "its lease is dropped, so gc may sweep it. An env a running process uses is kept whole; "
    "a later use loads it again (one manifest read).",
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
@click.option(
    "--fill-rate",
    default="100M",
    show_default=True,
    metavar="RATE",
    help="Bytes a second (K, M, G) the background copy of a whole env into the node cache "
    "may read from the store, once its first use has quietened (it also gives way while the "
    "store answers slowly: other nodes' jobs starting); `off`: no whole copies "
    "(each file is still copied on its first read, so the kernel never serves the env).",
)
@click.pass_context
def mount(
    ctx: click.Context,
    mountpoint: Path,
    foreground: bool,
    allow_other: bool,
    log_file: Path | None,
    kernel_mounts: bool,
    idle_release: str,
    cache_dir: str,
    cache_size: str,
    fill_rate: str,
) -> None:
    """Mount the envs filesystem at MOUNTPOINT (default /envs).

    MOUNTPOINT/WF/NODE/bin/python runs the current revision of a binding,
    MOUNTPOINT/WF/NODE@REV/ a pinned revision, MOUNTPOINT/.snapshots/ID/ a snapshot.
    An env that is bound but not built is built on first access. SIGTERM unmounts.
    A stale mount left by a killed daemon is cleaned first.
    """
    mountpoint = mountpoint.absolute()
    max_bytes = _size(cache_size)  # bad input fails before anything else
    rate = 0 if fill_rate.strip().lower() == "off" else _size(fill_rate)
    idle_seconds = duration(idle_release)
    status = _status_file(mountpoint)
    if foreground:
        import logging

        from envfs.fs.mount import run_daemon
        from envfs.service.catalog import StoreCatalog

        logging.getLogger().handlers.clear()
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s envfs[%(process)d] %(levelname)s %(message)s"
        )
        mountpoint.mkdir(parents=True, exist_ok=True)
        private_dir(status.parent)  # status files name the store and what is served
        svc = _service(ctx, quiet=True)
        catalog = StoreCatalog(svc)
        run_daemon(
            catalog,
            mountpoint,
            allow_other=allow_other or os.geteuid() == 0,
            foreground=True,
            status_path=status,
            kernel_mounts=kernel_mounts,
            cache=_node_cache(svc, cache_dir, max_bytes, rate),
            served_path=svc.settings.index / "served.json",
            store=svc.store.root.resolve(),
            idle_release=idle_seconds,
        )
        return
    from envfs.fs.mounted import is_stale_mount

    if os.path.ismount(mountpoint) and not is_stale_mount(mountpoint):
        raise EnvironmentProblem(
            f"{mountpoint} is already a mount point: run `envfs umount {mountpoint}` first"
        )
    _service(ctx, quiet=True).require_store()  # fail here, not in a detached daemon
    log = log_file or status.with_suffix(".log")
    extra = [] if kernel_mounts else ["--no-kernel-mounts"]
    extra += ["--cache", cache_dir, "--cache-size", cache_size, "--fill-rate", fill_rate]
    extra += ["--idle-release", idle_release]
    _spawn_daemon(ctx, mountpoint, allow_other, extra, log)


def _node_cache(svc: Service, where: str, max_bytes: int, fill_rate: int) -> NodeCache | None:
    """The node cache `mount --cache` asks for (see its help)."""
    from envfs.fs.nowait import blocking_is_cheap
    from envfs.node.cache import NodeCache

    if where == "off":
        return None
    if where == "auto":
        if blocking_is_cheap(os.fsencode(svc.store.root)):
            return None  # a store on a local disk is its own node-local copy
        return NodeCache(svc.settings.index / "cache", max_bytes, fill_rate)
    return NodeCache(Path(where).absolute(), max_bytes, fill_rate)


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

    from envfs.fs.mounted import is_stale_mount

    opts = ctx.find_root().params
    cmd = [sys.executable, "-m", "envfs"]
    if opts.get("store"):
        cmd += ["--store", str(opts["store"])]
    if opts.get("index"):
        cmd += ["--index", str(opts["index"])]
    cmd += ["mount", str(mountpoint), "--foreground"] + (["--allow-other"] if allow_other else [])
    cmd += extra
    private_dir(log.parent)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(fd, "ab") as out:
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
    from envfs.fs.mounted import (
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
def status(as_json: bool) -> None:
    """Mounts on this node: envs served, builds running and failed, cache statistics."""
    import time

    from envfs.core.config import runtime_dir
    from envfs.fs.mounted import daemon_alive, read_status

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
            how = ("kernel, early" if env.early else "kernel") if env.kernel else "fuse"
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
    help="File holding one admin bearer token every mutation needs; reads stay open "
    "[env: ENVFS_API_TOKEN_FILE].",
)
@click.option(
    "--tokens",
    "tokens_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="ENVFS_API_TOKENS",
    help="TOML file of named tokens, each with secret (or secret_file), workflows (glob "
    "patterns) and role (read or write); every route but /healthz and /metrics then needs "
    "one. Must be readable by its owner only [env: ENVFS_API_TOKENS].",
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
@click.option(
    "--index-url",
    metavar="URL",
    envvar=["UV_DEFAULT_INDEX", "UV_INDEX_URL"],
    help="Package index instead of PyPI for every requirement list this server locks "
    "[env: UV_DEFAULT_INDEX, UV_INDEX_URL]. Credentials in the URL are used, never stored.",
)
@click.option(
    "--extra-index-url",
    "extra_index_urls",
    metavar="URL",
    multiple=True,
    envvar=["UV_INDEX", "UV_EXTRA_INDEX_URL"],
    help="Another index, asked before the default one (repeatable) "
    "[env: UV_INDEX, UV_EXTRA_INDEX_URL].",
)
@click.pass_context
def serve_api(
    ctx: click.Context,
    host: str,
    port: int,
    token_file: Path | None,
    tokens_file: Path | None,
    mount_path: Path | None,
    audit_dsn: str | None,
    index_url: str | None,
    extra_index_urls: tuple[str, ...],
) -> None:
    """Serve the HTTP API for workflow platforms (docs/api.md).

    POST /envs binds (and builds in the background), GET /envs/WF/NODE says where the env
    is and its state; /openapi.json documents every route, /metrics is Prometheus text.
    Mutations need `Authorization: Bearer TOKEN` (the first line of --token-file). With
    --tokens instead (docs/api.md), each team's token reaches its own workflows only:
    403 for the others, lists filtered, 401 without a token, a read token changes nothing.

    Started as root, it is two processes: the HTTP side (everything a client sends is
    parsed there) runs as the user envfs-api (scripts/setup makes it; nobody if missing)
    with no capabilities; the root side keeps the store, the index and the tokens and
    runs the builds (docs/operations.md, "Security").
    """
    from envfs.api.backend import Backend
    from envfs.api.link import LocalLink
    from envfs.api.server import create_app
    from envfs.api.tokens import Tokens
    from envfs.api.wire import listen, serve
    from envfs.build.spec import make_indexes

    if (token_file is None) == (tokens_file is None):
        raise BadInput(
            "serve-api needs one of --token-file (one admin token) or --tokens (scoped tokens)"
        )
    make_indexes(index_url, extra_index_urls)  # a bad URL fails here, in one line
    sock = listen(host, port)

    def backend() -> Backend:
        """The privileged side: as root, made after the HTTP side is forked and dropped,
        so that side never holds the tokens, the index or the store open."""
        tokens = (
            Tokens.from_file(tokens_file)
            if tokens_file is not None
            else Tokens.admin(_read_token(token_file))  # type: ignore[arg-type]
        )
        svc = _service(ctx, quiet=True)
        audit = None
        if audit_dsn:
            from envfs.api.audit import PgAudit

            audit = PgAudit(audit_dsn, svc.settings.index / "audit-spool")
        return Backend(svc, tokens, mount_path, audit, indexes=(index_url, extra_index_urls))

    def started(b: Backend) -> None:
        where = f"http://{host}:{port} (store {b.service.store.root})"
        click.echo(f"envfs: serving the API on {where}", err=True)

    if os.geteuid() != 0:
        ours = backend()
        started(ours)
        serve(create_app(LocalLink(ours)), sock)
        return
    from envfs.api import privsep

    code = privsep.run(sock, backend, started)
    if code != 0:
        user = privsep.api_user()[0]
        raise EnvironmentProblem(
            f"the API's HTTP side (running as {user}) stopped with status {code}; "
            "the lines above say why"
        )


def _read_token(path: Path) -> str:
    """The bearer token: the first line of ``path``, printable ASCII, at least 8 characters.
    A token file other users can read is made private (0600) when it is ours, and refused
    when it is not: a token anyone on the host can read guards nothing."""
    from envfs.api.tokens import private_text

    lines = private_text(path, "token file", fix_ours=True).strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 8 or not token.isascii() or not token.isprintable():
        raise BadInput(f"the token in {path} is not 8 or more printable ASCII characters")
    return token
