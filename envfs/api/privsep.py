"""``serve-api`` as root, in two processes (privilege separation, as OpenSSH's sshd):

- **the HTTP side** is forked first, before the store, the index or a token file is
  opened, and becomes the API user (``envfs-api``, made by ``scripts/setup``; ``nobody``
  if it is missing) with no supplementary groups, ``no_new_privs``, no capabilities, its
  working directory ``/``, dying with its parent; then it executes a fresh interpreter
  (nothing of the parent's memory) with only the listening socket and its socket pairs
  open and an environment without credentials (no ``ENVFS_AUDIT_DSN``, no index URLs).
  It runs uvicorn and the routes (`envfs.api.server`): everything a client sends is
  parsed there.
- **the privileged side** (this process, root) keeps the store, the index, the tokens,
  the audit and the builds (`envfs.api.backend`), and reads only the typed JSON calls of
  `envfs.api.link`, deciding itself from each call's ``Authorization`` header what the
  caller may do. A package's source build it starts runs sandboxed as ``envfs-build``
  (`envfs.build.sandbox`), as every build does.

So a flaw in the HTTP stack taken over from the network gives the API user: it cannot
read the token files, the index or the store's locks, write the store, or ask for more
than the tokens it is shown allow. Not as root, `serve-api` is one process over the same
calls (`LocalLink`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envfs.api.backend import Backend
from envfs.api.link import SocketLink, serve_connection
from envfs.api.server import create_app
from envfs.api.wire import serve
from envfs.core.config import API_USER

#: Calls the HTTP side can have in flight at once (one socket pair each).
CONNECTIONS = 16
#: What the HTTP side keeps of the environment.
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "ENVFS_API_HEADER_TIMEOUT")
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MNT_DETACH = 2
_LIBC = ctypes.CDLL(None, use_errno=True)


def api_user() -> tuple[str, int, int]:
    """(name, uid, gid) of the user the HTTP side runs as: ``envfs-api``, else ``nobody``."""
    for name in (API_USER, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid
    return "nobody", 65534, 65534


def run(
    sock: socket.socket,
    make_backend: Callable[[], Backend],
    started: Callable[[Backend], None],
) -> int:
    """Serve the API on ``sock`` in two processes until a stop is asked for (SIGTERM or
    SIGINT, forwarded to the HTTP side); then wait for the builds running. Returns the
    HTTP side's exit status; what ``make_backend`` raises is raised, the child stopped."""
    _name, uid, gid = api_user()
    pairs = [socket.socketpair() for _ in range(CONNECTIONS)]
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - measured through the tests' real servers
        _child(sock, pairs, uid, gid, parent)
    sock.close()
    for _ours, theirs in pairs:
        theirs.close()
    try:
        backend = make_backend()
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    threads = [
        threading.Thread(
            target=serve_connection, args=(backend, ours), name="envfs-link", daemon=True
        )
        for ours, _theirs in pairs
    ]
    for thread in threads:
        thread.start()
    started(backend)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    before = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _pid, status = os.waitpid(pid, 0)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        backend.stop()
    for thread in threads:
        thread.join(5)
    return os.waitstatus_to_exitcode(status)


def _child(
    sock: socket.socket,
    pairs: list[tuple[socket.socket, socket.socket]],
    uid: int,
    gid: int,
    parent: int,
) -> None:  # pragma: no cover - runs in the forked child, until its exec
    try:
        for ours, _theirs in pairs:
            ours.close()
        fds = [sock.fileno(), *(theirs.fileno() for _ours, theirs in pairs)]
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]  # this envfs, not another
        reveal(uid, _interpreter_paths())
        become(uid, gid, parent)
        for fd in fds:
            os.set_inheritable(fd, True)  # every other descriptor closes on exec
        env = {k: v for k, v in os.environ.items() if k in KEEP_ENV}
        argv = [sys.executable, "-I", "-c", _BOOT, json.dumps(paths), *map(str, fds)]
        os.execve(sys.executable, argv, env)
    except OSError as exc:  # no user namespace here, no mount rights: say it in one line
        print(f"envfs: error: cannot start the API's HTTP side: {exc}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(1)


#: What the HTTP side's fresh interpreter runs (isolated: no PYTHON* variables, no user
#: site), with the parent's import path as its first argument.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from envfs.api.privsep import main; sys.exit(main(sys.argv[2:]))"
)


def main(argv: list[str]) -> int:  # pragma: no cover - the HTTP side, after its exec
    """The HTTP side: uvicorn on the listening socket ``argv[0]``, calling the privileged
    side over the socket pairs ``argv[1:]`` (descriptor numbers)."""
    listening, *pairs = (int(arg) for arg in argv)
    sock = socket.socket(fileno=listening)
    serve(create_app(SocketLink([socket.socket(fileno=fd) for fd in pairs])), sock)
    return 0


def _interpreter_paths() -> list[str]:
    """The directories Python imports from (the standard library, extension modules,
    site-packages, envfs): the HTTP side imports lazily after its drop."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})


def reveal(uid: int, paths: list[str]) -> None:
    """Let ``uid`` reach ``paths`` (read-only) where a directory on the way is closed to
    it (an interpreter under root's 0700 home): in a private mount namespace, a tmpfs
    over each such directory with only those paths bound back into it. Nothing else of
    it is then seen at all. As root, before `become`."""
    closed: dict[str, list[str]] = {}
    for path in paths:
        parts = Path(path).parts
        for i in range(2, len(parts) + 1):
            at = str(Path(*parts[:i]))
            st = os.stat(at)
            if st.st_uid != uid and not st.st_mode & 0o001:
                closed.setdefault(at, []).append(path)
                break
    if not closed:
        return
    if _LIBC.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    wanted = [p for ps in closed.values() for p in ps]
    outer = [p for p in wanted if not any(p.startswith(q + "/") for q in wanted)]
    stage = tempfile.mkdtemp(prefix="envfs-api-stage-")
    try:
        held = []
        for i, path in enumerate(outer):
            hold = os.path.join(stage, str(i))
            os.mkdir(hold)
            _mount(path, hold, None, _MS_BIND | _MS_REC)
            held.append((hold, path))
        for at in closed:
            _mount("tmpfs", at, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
        for hold, path in held:
            os.makedirs(path, exist_ok=True)
            _mount(hold, path, None, _MS_BIND | _MS_REC)
            _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
            _LIBC.umount2(hold.encode(), _MNT_DETACH)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def b(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    if _LIBC.mount(b(source), b(target), b(fstype), flags, b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def become(uid: int, gid: int, parent: int) -> None:
    """This process as ``uid``/``gid`` for good (no groups, no capabilities,
    ``no_new_privs``), dying with ``parent``, in ``/``."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if _LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # after the uid change, which clears it; it holds across the exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before that: nothing to serve for
        os._exit(0)
    os.chdir("/")
