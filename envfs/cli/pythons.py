"""Interpreters captured into the store: python add, python ls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from envfs.cli.app import _emit, _human, _service, main

if TYPE_CHECKING:
    pass


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
