"""The API's routes that carry an env elsewhere: ``GET /envs/{wf}/{node}/export`` streams
a bundle, an OCI image archive or the template (a bearer token is needed: a bundle holds
every byte of the env) and ``GET /envs/{wf}/{node}/sbom`` answers its CycloneDX SBOM. The
same bytes as ``envfs export`` and ``envfs sbom``."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse

from envfs.api.models import Node, Wf
from envfs.core.names import validate_name
from envfs.service.envs import Service

log = logging.getLogger(__name__)

#: Media type and file name suffix of each export format.
FORMATS = {
    "bundle": ("application/zstd", "envfs"),
    "oci-archive": ("application/x-tar", "oci.tar"),
    "template": ("application/x-tar", "template.tar"),
}
Format = Literal["bundle", "oci-archive", "template"]


def add_routes(
    app: FastAPI,
    service: Service,
    authorized: Callable[..., None],
    allow: Callable[[Request, str], None],
) -> None:
    """The export routes; ``allow(request, workflow)`` refuses a token that may not use it."""

    @app.get(
        "/envs/{wf}/{node}/export",
        dependencies=[Depends(authorized)],
        response_class=StreamingResponse,
        responses={200: {"content": {t: {} for t, _ in FORMATS.values()}}},
    )
    def export(
        request: Request,
        wf: Wf,
        node: Node,
        format: Format = Query("bundle"),  # noqa: B008
    ) -> StreamingResponse:
        """The env as a bundle (``envfs import``), an OCI image archive (``podman load``)
        or its template (a tar of pyproject.toml, uv.lock, .python-version), streamed."""
        service.require_store()
        target = f"{validate_name(wf, 'workflow')}/{validate_name(node, 'node')}"
        allow(request, wf)
        service.show(wf, node)  # a missing binding is a 404 before anything streams
        writers: dict[str, Callable[[IO[bytes]], Any]] = {
            "bundle": lambda out: service.export_bundle(target, out),
            "oci-archive": lambda out: service.export_oci_archive(target, out),
            "template": lambda out: service.template_tar(target, out),
        }
        media, suffix = FORMATS[format]
        return StreamingResponse(
            _streamed(writers[format]),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{wf}-{node}.{suffix}"'},
        )

    @app.get(
        "/envs/{wf}/{node}/sbom",
        response_class=Response,
        responses={200: {"content": {"application/vnd.cyclonedx+json": {}}}},
    )
    def sbom(request: Request, wf: Wf, node: Node) -> Response:
        """The env's CycloneDX 1.6 SBOM (``envfs sbom``)."""
        service.require_store()
        target = f"{validate_name(wf, 'workflow')}/{validate_name(node, 'node')}"
        allow(request, wf)
        return Response(service.sbom(target), media_type="application/vnd.cyclonedx+json")


def _streamed(write: Callable[[IO[bytes]], Any]) -> Iterator[bytes]:
    """What ``write`` writes, as chunks: it runs in a thread writing into a pipe."""
    r, w = os.pipe()
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(w, "wb") as out:
                write(out)
        except BrokenPipeError:
            pass  # the client went away
        except BaseException as exc:
            log.error("export failed while streaming: %s: %s", type(exc).__name__, exc)
            failed.append(exc)

    thread = threading.Thread(target=produce, name="export", daemon=True)
    thread.start()
    with os.fdopen(r, "rb") as src:
        while chunk := src.read(1 << 20):
            yield chunk
    thread.join()
    if failed:  # the response is cut short: the client sees a truncated, refused bundle
        raise RuntimeError("export failed while streaming") from failed[0]
