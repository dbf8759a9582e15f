"""The HTTP API fuzzed from its own OpenAPI document (schemathesis) through a real
`envfs serve-api` on loopback, with the bearer token: no route answers 5xx, whatever it is sent.

Every operation of ``/openapi.json`` gets schema-valid (positive) and schema-invalid (negative)
requests; those with ``{wf}/{node}`` also get positive ones at a binding that exists. Besides
"no 5xx": every status code, content type, header and body as documented (errors included),
and invalid requests refused with a 4xx.

Bounded so it stays a test, not a campaign: EXAMPLES per run, derandomized (the same cases
every run), no shrinking, a timeout on every request. Driven by hand rather than by
``schemathesis.pytest.from_fixture``, whose runner reads ``Node._nodeid`` (gone in pytest 9).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.test_api import TOKEN, Server, start_server, stop_server
from tests.conftest import PY, Env

pytestmark = pytest.mark.slow

#: Examples per operation and run (positive; negative; positive at an existing binding).
EXAMPLES = 25
#: Seconds a request may take before the case fails as a hang.
REQUEST_TIMEOUT = 30
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)


CHECKS: list[CheckFunction] = [
    not_a_server_error,
    content_type_conformance,
    response_headers_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
]


@pytest.fixture
def served(local: Env) -> Iterator[Server]:
    # a real store: wf/a with two revisions (reads and rollbacks find something)
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/a", "extra-b==2.0", "--python", PY)
    server = start_server(local)
    try:
        yield server
    finally:
        stop_server(server)  # also fails the test if the server logged a traceback


def _named(case: schemathesis.Case[Any], n: int) -> schemathesis.Case[Any]:
    """``case`` with valid names in its body: past validation, to the resolver and uv."""
    if isinstance(case.body, dict):
        case.body = {**case.body, "workflow_id": "fuzz", "node_id": f"n{n}"}
    return case


def _fuzz(
    served: Server, operation: Any, mode: GenerationMode, named: bool = False, **fixed: Any
) -> None:
    strategy = operation.as_strategy(generation_mode=mode, **fixed)
    if named:
        strategy = st.builds(_named, strategy, st.integers(0, 9))

    @FUZZ
    @given(strategy)
    def run(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=served.url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT
        )

    run()


#: Text no generator is sure to try: Latin-1, CJK, a combining mark, a right-to-left mark.
ODD = "caf\u00e9-\u4e2d\u0301\u200f"
#: Nesting past what Python's json module parses (it raises RecursionError, not ValueError).
DEEP = b"[" * 20000 + b"]" * 20000


def _hostile(served: Server, operations: list[Any]) -> list[str]:
    """Every operation with non-ASCII everywhere a client controls (token, path, query,
    body) and, where it takes a body, one nested too deeply for a parser: never a 5xx, and
    every answer as documented."""
    import requests

    failures = []
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    for op in operations:
        params = {"wf": ODD, "node": ODD} if "{wf}" in op.path else None
        body = {"workflow_id": ODD, "node_id": ODD, "packages": [ODD], "python": ODD}
        for token in (TOKEN, "caf\u00e9"):
            case = op.Case(
                path_parameters=params,
                headers={"Authorization": f"Bearer {token}"},
                query={"workflow": ODD} if op.label == "GET /envs" else None,
                **({"body": body, "media_type": "application/json"} if op.method == "post" else {}),
            )
            try:
                case.call_and_validate(base_url=served.url, checks=checks, timeout=REQUEST_TIMEOUT)
            except (Exception, FailureGroup) as exc:
                failures.append(f"{op.label} (non-ASCII, token {token!r}): {exc}")
        if op.method in ("post", "delete"):
            path = op.path.replace("{wf}", "wf").replace("{node}", "a")
            got = requests.request(
                op.method.upper(), served.url + path, data=DEEP, headers={
                    **AUTH, "Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT
            )  # fmt: skip
            if got.status_code >= 500:
                failures.append(f"{op.label} (nested {len(DEEP) // 2} deep): {got.status_code}")
    return failures


def test_no_route_answers_5xx(served: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", timeout=30)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document itself is sound
        operations.append(result.ok())
    assert len(operations) >= 8, [op.label for op in operations]
    operations.sort(key=lambda op: op.method == "delete")  # deletions last
    positive, negative = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
    failures: list[str] = []
    for op in operations:
        runs: list[tuple[str, GenerationMode, bool, dict[str, Any]]] = [
            ("positive", positive, False, {}),
            ("negative", negative, False, {}),
        ]
        if "{wf}" in op.path:
            at = {"path_parameters": {"wf": "wf", "node": "a"}}
            runs.append(("positive, at wf/a", positive, False, at))
        if op.label == "POST /envs":
            runs.append(("positive, valid names", positive, True, {}))
        for what, mode, named, fixed in runs:
            try:
                _fuzz(served, op, mode, named, **fixed)
            except Unsatisfiable:
                pass  # nothing to negate (no parameters, or only free-form strings)
            except (Exception, FailureGroup) as exc:  # FailureGroup: a BaseExceptionGroup
                failures.append(f"{op.label} ({what}): {exc}")
    failures += _hostile(served, operations)
    assert not failures, "\n\n".join(failures)
    # the fuzzing got past validation too: real bindings were read and shown
    metrics = served.call("GET", "/metrics").text
    for route in ("/envs/{wf}/{node}", "/envs/{wf}/{node}/history"):
        assert f'code="200",method="GET",route="{route}"' in metrics, metrics
