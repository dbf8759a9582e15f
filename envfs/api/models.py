"""The API's bodies and answers (pydantic): what a client sends and gets, as /openapi.json
documents them, and the name rules the schema shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from fastapi import Path as PathParam

from envfs.build import interpreters
from envfs.core.errors import (
    BadInput,
)
from envfs.core.names import MAX_NAME, NAME_PATTERN, validate_name

#: How the schema documents a workflow or node name (checked by `validate_name`, whose
#: messages say what is wrong in words; the schema does not enforce it).
_NAME_DOC: dict[str, Any] = {"pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME}


Wf = Annotated[str, PathParam(json_schema_extra=_NAME_DOC, description="Workflow")]


Node = Annotated[str, PathParam(json_schema_extra=_NAME_DOC, description="Node")]


class Problem(pydantic.BaseModel):
    """Every error body: one sentence, the one the CLI prints for the same mistake."""

    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in (
        (400, "A body that cannot be parsed (rollback)"),
        (401, "No right bearer token (a mutation; any route with --tokens): nothing written"),
        (403, "The token may not use this workflow, or may only read: nothing was written"),
        (404, "No such binding or revision"),
        (409, "Busy: another build did not finish in time"),
        (413, "The body is over 4 MiB"),
        (415, "The body is neither JSON nor form fields"),
        (422, "A bad name, requirement, project or body"),
        (503, "The store or uv cannot work now"),
    )
}


class _NamedNode(pydantic.BaseModel):
    """A request body naming a workflow node (names checked as the CLI checks them)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    workflow_id: str = pydantic.Field(json_schema_extra=_NAME_DOC)
    node_id: str = pydantic.Field(json_schema_extra=_NAME_DOC)

    @pydantic.field_validator("workflow_id", "node_id")
    @classmethod
    def _name(cls, value: str, info: pydantic.ValidationInfo) -> str:
        try:
            return validate_name(value, "workflow" if info.field_name == "workflow_id" else "node")
        except BadInput as exc:
            raise ValueError(exc.message) from None


class EnvRequest(_NamedNode):
    """``POST /envs``: one of packages, requirements (a file's text, ``uv export`` output
    too) or pyproject + uv_lock (a uv project's two files)."""

    packages: list[str] = []
    requirements: str | None = None
    pyproject: str | None = None
    uv_lock: str | None = None
    python: str | None = pydantic.Field(
        None, json_schema_extra={"pattern": r"^(?:(?:cpython|python)[-@]?)?3(?:\.[0-9]+){0,2}$"}
    )
    build: Literal["now", "lazy"] = "now"
    reason: str = ""

    @pydantic.field_validator("python")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        # a version, never a path: a path would be run (as this server's user) to probe it
        if value is not None and not interpreters.is_version_request(value):
            raise ValueError("give a Python version such as 3.12 or 3.12.1 (not a path)")
        return value

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> EnvRequest:
        project = self.pyproject is not None or self.uv_lock is not None
        if project and (self.pyproject is None or self.uv_lock is None):
            raise ValueError("a project needs both pyproject and uv_lock")
        given = sum([bool(self.packages) or self.requirements is not None, project])
        if given != 1:
            raise ValueError("give packages and/or requirements, or pyproject + uv_lock")
        return self


class EnvView(pydantic.BaseModel):
    """A binding as the API shows it: what to hand an engine, and its state."""

    workflow_id: str
    node_id: str
    revision: int
    snapshot_id: str
    state: str
    reason: str | None
    python_version: str
    env_path: str  # <mount>/<wf>/<node>: follows rebinds
    python_path: str  # env_path/bin/python: e.g. Ray's py_executable
    pinned_path: str  # <mount>/<wf>/<node>@<rev>: this revision, whatever comes after


class EnvPage(pydantic.BaseModel):
    items: list[EnvView]
    total: int
    offset: int
    limit: int


class RollbackRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    to: int | None = None


class Health(pydantic.BaseModel):
    ok: bool
    version: str
    store_exists: bool  # (not where it is: this answer needs no token)
    audit_queued: int | None = None  # rows waiting for PostgreSQL (None: no --audit-dsn)


class BatchBinding(_NamedNode):
    """One binding of ``POST /envs:batch``: a node and a snapshot the store has."""

    snapshot_id: str = pydantic.Field(pattern=r"^[0-9a-f]{6,64}$")


class BatchRequest(pydantic.BaseModel):
    """``POST /envs:batch``: bind many nodes to snapshots the store has (by id or prefix)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    bindings: list[BatchBinding] = pydantic.Field(max_length=100_000)
    reason: str = ""


class BatchFailure(pydantic.BaseModel):
    index: int  # in ``bindings``, from 0
    error: str


class BatchAnswer(pydantic.BaseModel):
    """What ``POST /envs:batch`` did: each binding is all or nothing."""

    bound: int
    unchanged: int
    failed: list[BatchFailure]
