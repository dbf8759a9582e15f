"""Who is calling the API: its bearer tokens (`Tokens`), and the one file format they come
from, ``serve-api --tokens FILE`` (TOML; this module owns it)::

    [tokens.teama]
    secret = "..."                 # or secret_file = "/etc/envfs/teama.token"
    workflows = ["teama*"]         # glob patterns (fnmatch, case-sensitive)
    role = "write"                 # or "read"

With such a file every route but ``/healthz`` and ``/metrics`` needs a token; a token may
read (and with ``role = "write"`` change) only workflows its patterns match. The file and
every ``secret_file`` must be readable by their owner only: one others can read is refused
(a secret anyone on the host can read guards nothing). ``--token-file`` is one admin token
(``*``, write) with reads left open, as before scoped tokens. Secrets are compared in
constant time, against every token whatever matches first.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydantic

from envfs.core.errors import BadInput

log = logging.getLogger(__name__)

#: The shortest secret a tokens file may hold.
MIN_SECRET = 16


class TokenSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    secret: str | None = None
    secret_file: Path | None = None
    workflows: list[str] = pydantic.Field(min_length=1)
    role: Literal["read", "write"]


class TokensFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    tokens: dict[str, TokenSpec] = pydantic.Field(min_length=1)


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    workflows: tuple[str, ...]
    secret: bytes

    @property
    def writes(self) -> bool:
        return self.role == "write"

    def allows(self, workflow: str) -> bool:
        """Whether this token may see (and, if it writes, change) ``workflow``."""
        return any(fnmatch.fnmatchcase(workflow, pattern) for pattern in self.workflows)


@dataclass(frozen=True)
class Tokens:
    tokens: tuple[Token, ...]
    #: reads need no token (``--token-file``: one admin token, reads open as before)
    open_reads: bool

    @classmethod
    def admin(cls, secret: str) -> Tokens:
        return cls((Token("admin", "write", ("*",), secret.encode()),), open_reads=True)

    @classmethod
    def from_file(cls, path: Path) -> Tokens:
        """The tokens of a ``--tokens`` file; `BadInput` in one line if it cannot serve."""
        raw = private_text(path, "tokens file")
        try:
            spec = TokensFile.model_validate(tomllib.loads(raw))
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{path} is not TOML: {exc}") from None
        except pydantic.ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(x) for x in first["loc"])
            raise BadInput(f"{path}: {where}: {first['msg']}") from None
        tokens = []
        for name, token in spec.tokens.items():
            if (token.secret is None) == (token.secret_file is None):
                raise BadInput(f"{path}: token {name!r} needs one of secret or secret_file")
            secret = token.secret
            if token.secret_file is not None:
                lines = private_text(token.secret_file, f"secret_file of {name!r}").split()
                secret = lines[0] if lines else ""
            assert secret is not None
            if len(secret) < MIN_SECRET or not secret.isprintable() or not secret.isascii():
                raise BadInput(
                    f"{path}: the secret of {name!r} is shorter than {MIN_SECRET} printable "
                    "ASCII characters"
                )
            tokens.append(Token(name, token.role, tuple(token.workflows), secret.encode()))
        if len({t.secret for t in tokens}) != len(tokens):
            raise BadInput(f"{path}: two tokens share a secret; give each its own")
        return cls(tuple(tokens), open_reads=False)

    def identify(self, given: str) -> Token | None:
        """The token whose secret is ``given`` (a header's text, any Latin-1), or None;
        every secret is compared, in constant time."""
        raw = given.encode("utf-8", "surrogateescape")
        found = None
        for token in self.tokens:
            if hmac.compare_digest(raw, token.secret):
                found = token
        return found


def private_text(path: Path, what: str, fix_ours: bool = False) -> str:
    """A secret-bearing file's text (UTF-8), refused in one line if other users can read
    it; with ``fix_ours``, one of ours is made 0600 first (with a warning) instead."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077 and fix_ours and st.st_uid == os.geteuid():
                os.fchmod(f.fileno(), 0o600)
                log.warning("%s was readable by other users; made it 0600", path)
            elif st.st_mode & 0o077:
                raise BadInput(
                    f"the {what} {path} can be read by other users; chmod 600 it (or 400)"
                )
            return f.read().decode("utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read the {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"the {what} {path} is not UTF-8 text") from None


#: Routes anyone may call, with or without a token.
OPEN_ROUTES = ("/healthz", "/metrics")
READS = ("GET", "HEAD", "OPTIONS")
NEEDS_TOKEN = "a bearer token is needed"
READ_ONLY = "this token may only read"


@dataclass(frozen=True)
class Admission:
    """What a request's head earns it: its token (None: anonymous), or a refusal."""

    token: Token | None
    status: int = 200
    detail: str = ""


def admit(tokens: Tokens, method: str, path: str, authorization: str) -> Admission:
    """Checked before a body is read: who calls, and whether it may call ``path`` at all
    (which workflows it may touch is the route's to check, with `Token.allows`)."""
    scheme, _, given = authorization.partition(" ")
    token = tokens.identify(given.strip()) if scheme.lower() == "bearer" else None
    if path in OPEN_ROUTES:
        return Admission(token)
    if token is None and not (tokens.open_reads and method in READS):
        return Admission(None, 401, NEEDS_TOKEN)
    if token is not None and method not in READS and not token.writes:
        return Admission(token, 403, READ_ONLY)
    return Admission(token)
