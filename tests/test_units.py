"""Pure logic: names, requirements, snapshot ids, interpreter discovery."""

from __future__ import annotations

import pytest

from envfs import interpreters, spec
from envfs.errors import BadInput, InterpreterNotFound
from envfs.model import Interpreter
from envfs.names import parse_target

INTERP = Interpreter(
    implementation="cpython",
    version="3.12.1",
    abi="cpython-312-x86_64-linux-gnu",
    platform="linux-x86_64-glibc2.36",
    path="/opt/py/bin/python3.12",
)


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b/c",
        "",
        "/x",
        "x/",
        ".hidden/x",
        "a/.b",
        "a\0b/c",
        "n" * 300 + "/x",
        "a@1/b",
        "a b/c",
        "../../etc/passwd",
    ],
)
def test_bad_targets_are_refused_with_one_line(bad: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_target(bad)
    assert "\n" not in err.value.message
    assert err.value.exit_code == 3


def test_good_targets_parse() -> None:
    assert parse_target("etl/prep-1.2_x") == ("etl", "prep-1.2_x")


def test_requirements_are_canonical_and_validated() -> None:
    assert spec.normalize_requirements(["six==1.16.0", "Attrs", "six==1.16.0"]) == [
        "Attrs",
        "six==1.16.0",
    ]
    for bad in (["-e ."], ["./local"], [], ["foo)"], ["foo bar"], ["six=="]):
        with pytest.raises(BadInput):
            spec.normalize_requirements(bad)
    marked = 'six==1.16.0 ; python_version >= "3.8"'  # as uv export writes it
    assert spec.normalize_requirements([marked]) == [marked]


def test_snapshot_id_is_stable_and_depends_on_every_input() -> None:
    files = spec.ProjectFiles(pyproject="[project]\nname='x'\n", lock="version = 1\n")
    same = spec.ProjectFiles(pyproject="[project]\nname = 'x'\n", lock="version = 1\n")
    base = spec.snapshot_id(files, INTERP)
    assert base == spec.snapshot_id(same, INTERP)  # formatting does not matter
    assert base == spec.snapshot_id(files, INTERP.model_copy(update={"path": "/elsewhere"}))
    other_lock = spec.ProjectFiles(pyproject=files.pyproject, lock="version = 2\n")
    assert spec.snapshot_id(other_lock, INTERP) != base
    assert spec.snapshot_id(files, INTERP.model_copy(update={"version": "3.12.2"})) != base
    assert spec.snapshot_id(files, INTERP.model_copy(update={"platform": "linux-aarch64"})) != base
    assert len(base) == 64


def test_pyproject_pins_the_minor_version() -> None:
    text = spec.render_pyproject(["six"], INTERP)
    assert 'requires-python = "==3.12.*"' in text
    assert '"six"' in text


def test_discovers_a_pyenv_interpreter_uv_cannot_see() -> None:
    found = interpreters.find("3.12")
    assert found.version.startswith("3.12.")
    assert found.implementation == "cpython"
    assert "shims" not in found.path


def test_missing_interpreter_names_what_is_there() -> None:
    with pytest.raises(InterpreterNotFound) as err:
        interpreters.find("3.99")
    assert "3.99" in err.value.message and "found:" in err.value.message
    with pytest.raises(BadInput):
        interpreters.find("latest")


def test_uv_failures_are_classified_by_structure_not_package_names() -> None:
    from envfs.builder import _uv_network_failure

    missing = (
        "Using CPython 3.12.1\n"
        "error: No solution found when resolving dependencies\n"
        "  cause: Because dns-connect-fetch-pkg was not found in the package registry and your"
        " project depends on dns-connect-fetch-pkg==1.0, we can conclude that ...\n"
    )
    offline = (
        "error: Request failed after 3 retries in 10.8s\n"
        "  cause: Failed to fetch: http://127.0.0.1:9/simple/six/\n"
        "  cause: Connection refused (os error 111)\n"
    )
    fancy = "  \u00d7 Failed to fetch: `https://pypi.org/simple/connectorx/`\n"
    assert not _uv_network_failure(missing)
    assert _uv_network_failure(offline)
    assert _uv_network_failure(fancy)
    assert not _uv_network_failure("")


def test_a_name_ending_in_a_newline_is_refused() -> None:
    from envfs.errors import BadInput
    from envfs.names import validate_name

    assert validate_name("prep") == "prep"
    with pytest.raises(BadInput):
        validate_name("prep\n")
