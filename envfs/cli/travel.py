"""Commands that carry envs elsewhere: ``envfs export`` (a bundle, a template) and
``envfs import``."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import click

from envfs.cli.app import _emit, _service, main
from envfs.core.errors import BadInput
from envfs.core.names import parse_target


@main.command(name="export")
@click.argument("target", metavar="WF/NODE[@REV]")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    help="Write a bundle (tar + zstd) to FILE (`-`: stdout): everything another store needs "
    "to serve the env with no network. The same snapshot always gives the same bytes.",
)
@click.option(
    "--template",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Write the pyproject.toml, uv.lock and .python-version the env was built from to "
    "DIR (`uv sync --frozen` there installs exactly its packages).",
)
@click.option(
    "--oci",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Write an OCI image layout to DIR (a new directory) that runs the env at "
    "/envs/WF/NODE with no Python in the image (podman run oci:DIR ...).",
)
@click.option(
    "--oci-archive",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Write the same image as one tar (podman load -i FILE, docker load -i FILE).",
)
@click.option(
    "--base",
    metavar="oci:DIR[:TAG]",
    help="With --oci/--oci-archive: build the image over this one (an OCI image layout, "
    "its TAG or only image) instead of envfs's C runtime layer.",
)
@click.pass_context
def export_cmd(
    ctx: click.Context,
    target: str,
    output: str | None,
    template: Path | None,
    oci: Path | None,
    oci_archive: Path | None,
    base: str | None,
) -> None:
    """Export a built env: a bundle for `envfs import` elsewhere, an OCI image, or its
    template."""
    if sum(x is not None for x in (output, template, oci, oci_archive)) != 1:
        raise BadInput(
            "give one of -o FILE (a bundle), --oci DIR or --oci-archive FILE (an image), "
            "--template DIR"
        )
    if base is not None and oci is None and oci_archive is None:
        raise BadInput("--base is for images: give it with --oci DIR or --oci-archive FILE")
    svc = _service(ctx)
    if oci_archive is not None:
        digest = _atomically(oci_archive, lambda out: svc.export_oci_archive(target, out, base))
        click.echo(f"wrote an OCI image archive of {target} to {oci_archive}: {digest}")
        return
    if oci is not None:
        digest = svc.export_oci(target, oci, base)
        click.echo(f"wrote an OCI image of {target} to {oci}: {digest}")
        return
    if template is not None:
        names = svc.export_template(target, template)
        click.echo(f"wrote {', '.join(names)} to {template}")
        return
    assert output is not None
    if output == "-":
        if sys.stdout.isatty():
            raise BadInput("a bundle is binary: give -o FILE, or send stdout to a file or pipe")
        sys.stdout.flush()
        svc.export_bundle(target, sys.stdout.buffer)
        return
    dest = Path(output)
    head = _atomically(dest, lambda out: svc.export_bundle(target, out))
    size = dest.stat().st_size
    click.echo(f"exported {head.exported_from} ({head.snapshot_id[:12]}) to {dest}, {size} bytes")


T = TypeVar("T")


def _atomically(dest: Path, write: Callable[[IO[bytes]], T]) -> T:
    """``write`` into a new file that becomes ``dest`` only once complete (nothing
    half-written is ever at ``dest``)."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as out:
            result = write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return result


@main.command(name="import")
@click.argument("bundle", metavar="FILE")
@click.option("--bind", "bind_as", metavar="WF/NODE", help="Bind WF/NODE to the imported env.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def import_cmd(ctx: click.Context, bundle: str, bind_as: str | None, as_json: bool) -> None:
    """Import a bundle written by `envfs export` (FILE, or `-` for stdin).

    Every file is checked against its manifest, the snapshot id against its spec and the
    interpreter against its digest before anything is published; a damaged or tampered
    bundle is refused and leaves nothing in the store. Needs no network. Content the store
    has already is linked, not stored again.
    """
    target = parse_target(bind_as) if bind_as else None
    svc = _service(ctx)
    if bundle == "-":
        report = svc.import_bundle(sys.stdin.buffer, target, "from stdin")
    else:
        try:
            source = open(bundle, "rb")  # noqa: SIM115  (closed below)
        except OSError as exc:
            raise BadInput(f"cannot read {bundle}: {exc.strerror}") from None
        with source:
            report = svc.import_bundle(source, target, f"from {Path(bundle).name}")
    if as_json:
        _emit(report.model_dump())
        return
    what = ", ".join(report.added) or "nothing new (the store had it)"
    click.echo(f"imported {report.snapshot_id[:12]}: added {what}")
    if report.binding is not None:
        click.echo(f"{report.binding}@{report.revision} -> {report.snapshot_id[:12]}")


@main.command()
@click.argument("target", metavar="WF/NODE[@REV]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["cyclonedx-json"]),
    default="cyclonedx-json",
    show_default=True,
    help="The document format (CycloneDX 1.6, JSON).",
)
@click.pass_context
def sbom(ctx: click.Context, target: str, fmt: str) -> None:
    """Print the software bill of materials of a built env: the interpreter and every
    installed distribution with its version, PURL and the sha256 the lock pins. The same
    env always gives the same bytes."""
    click.echo(_service(ctx).sbom(target), nl=False)
