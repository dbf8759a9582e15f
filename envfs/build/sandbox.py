"""Source builds run unprivileged. uv runs a package's build backend (an sdist's setup.py)
when it locks a package whose metadata only a build gives, or installs one that has no
wheel; that code must not run as root, nor see the store, the shared uv cache, the node's
index or the API's token files as writable. So envfs always asks uv with ``--no-build``
first (nothing to build: nothing changes, no cost), and only when uv says a build is
needed does it run that step again **in the sandbox**:

- as the build user (``envfs-build`` if ``scripts/setup`` made it, else ``nobody``), with
  no supplementary groups and ``no_new_privs``;
- in a private mount namespace where the interpreter and uv are bound read-only into a
  scratch directory the build user owns, the only place it may write (its own uv cache,
  HOME and output there);
- with the package indexes (and their credentials) uv would use, to fetch build
  dependencies.

The sandbox's output is wheels (`build_wheels`) or a ``uv.lock`` (`lock`); the privileged
side installs wheels only (``--no-build``), so nothing but uv itself writes the store.
When envfs does not run as root, build code runs as that user: no sandbox is needed to
keep it from root's files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from envfs.core.errors import EnvironmentProblem

#: The user builds run as: made by scripts/setup (`useradd --system envfs-build`).
BUILD_USER = "envfs-build"
#: Seconds one sandboxed step may take.
BUILD_TIMEOUT = 1800


def build_ids() -> tuple[int, int]:
    """(uid, gid) of the build user: ``envfs-build``, else ``nobody``."""
    for name in (BUILD_USER, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return 65534, 65534


@dataclass(frozen=True)
class Sandbox:
    """A scratch directory the build user owns, with the interpreter's prefix at ``prefix``
    (its executable ``python``) and uv at ``uv`` inside it (bound read-only as root)."""

    scratch: Path
    prefix: str  # the interpreter's prefix as the sandbox sees it
    python: str
    uv: str
    binds: tuple[tuple[str, str], ...]

    def give(self, path: Path) -> None:
        """Hand ``path`` (a file or tree made in the scratch dir) to the build user."""
        if os.geteuid() != 0:
            return
        uid, gid = build_ids()
        os.chown(path, uid, gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

    def run(
        self, args: list[str], env: dict[str, str], timeout: float = BUILD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """uv with ``args`` in the sandbox; its output."""
        return self.run_program([self.uv, *args], env, timeout)

    def run_program(
        self, cmd: list[str], env: dict[str, str], timeout: float = BUILD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``cmd`` (a program the sandbox shows: ``uv``, ``python``) in the sandbox."""
        base = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.scratch / "home"),
            "UV_CACHE_DIR": str(self.scratch / "uv-cache"),
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1",
            "LC_ALL": "C.UTF-8",
        }
        keep = {
            k: v
            for k, v in env.items()
            if k.startswith("UV_INDEX") or k in _INDEX_VARS or k.upper() in _NETWORK_VARS
        }
        full = {**base, **keep}
        if os.geteuid() == 0:
            cmd = self._dropped(cmd)
        try:
            return subprocess.run(
                cmd,
                cwd=self.scratch,
                env=full,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentProblem(
                f"{os.path.basename(cmd[0])} in the build sandbox took more than {timeout:.0f} s"
            ) from None

    def _dropped(self, cmd: list[str]) -> list[str]:
        unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
        if unshare is None or setpriv is None:
            raise EnvironmentProblem(
                "a package needs a source build and this node cannot run it unprivileged "
                "(no unshare/setpriv: Debian util-linux); or use --build-policy wheels-only"
            )
        uid, gid = build_ids()
        script = " && ".join(
            f'mount --bind "${{{2 * i + 1}}}" "${{{2 * i + 2}}}" && '
            f'mount -o remount,bind,ro "${{{2 * i + 2}}}"'
            for i in range(len(self.binds))
        )
        shift = f"shift {2 * len(self.binds)}"
        drop = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs"]
        flat = [p for pair in self.binds for p in pair]
        return [unshare, "--mount", "--propagation", "private", "sh", "-c",
                f'{script} && {shift} && exec "$@"', "sandbox", *flat, *drop, *cmd]  # fmt: skip


_INDEX_VARS = {"UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX"}
#: How this node reaches the network (proxies, certificate authorities), kept for the
#: sandbox: build dependencies come from the indexes too.
_NETWORK_VARS = {
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "UV_NATIVE_TLS", "UV_INSECURE_HOST", "REQUESTS_CA_BUNDLE",
}  # fmt: skip


@contextmanager
def sandbox(python: str, uv: str) -> Iterator[Sandbox]:
    """A fresh sandbox for one step: ``python`` is the interpreter's executable (its whole
    prefix is made visible), ``uv`` uv's binary; removed after."""
    uid, gid = build_ids()
    prefix = Path(python).resolve().parent.parent
    rel = os.path.relpath(Path(python).resolve(), prefix)
    with tempfile.TemporaryDirectory(prefix="envfs-sandbox-") as tmp:
        scratch = Path(tmp)
        for sub in ("home", "uv-cache", "out", "work", "python"):
            (scratch / sub).mkdir()
        (scratch / "uv").touch()
        if os.geteuid() == 0:
            for path in [scratch, *scratch.iterdir()]:
                os.chown(path, uid, gid)
            os.chmod(scratch, 0o755)
            binds = ((str(prefix), str(scratch / "python")), (uv, str(scratch / "uv")))
            seen = str(scratch / "python")
            yield Sandbox(scratch, seen, f"{seen}/{rel}", str(scratch / "uv"), binds)
        else:
            yield Sandbox(scratch, str(prefix), str(prefix / rel), uv, ())


def locked_sdists(lock: str, names: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (url, sha256) of the sdist ``uv.lock`` pins for each of ``names``."""
    import tomllib

    from envfs.build.spec import project_name

    wanted = {project_name(n) for n in names}
    out = {}
    for pkg in tomllib.loads(lock).get("package", []):
        name = project_name(str(pkg.get("name", "")))
        sdist = pkg.get("sdist")
        if name in wanted and isinstance(sdist, dict) and "url" in sdist:
            digest = str(sdist.get("hash", ""))
            out[name] = (str(sdist["url"]), digest.removeprefix("sha256:"))
    return out


def fetch_sdist(url: str, sha256: str, dest: Path) -> Path:
    """Download an sdist the lock pins (checked against its sha256) into ``dest``."""
    import hashlib
    import urllib.parse
    import urllib.request

    name = os.path.basename(urllib.parse.urlsplit(url).path)
    path = dest / name
    try:
        with urllib.request.urlopen(url, timeout=300) as resp, open(path, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot download {name} to build it: {exc}") from None
    with open(path, "rb") as f:
        got = hashlib.file_digest(f, "sha256").hexdigest()
    if sha256 and got != sha256:
        raise EnvironmentProblem(f"{name} does not match the sha256 its lock pins")
    return path


def build_wheels(
    python: str, uv: str, lock: str, names: list[str], env: dict[str, str], out: Path
) -> list[Path]:
    """Build the sdists ``lock`` pins for ``names`` into wheels in ``out``, in the sandbox
    (`uv build --wheel` as the build user); the wheels. Raises `EnvironmentProblem`."""
    sdists = locked_sdists(lock, names)
    missing = sorted(set(names) - set(sdists))
    if missing:
        raise EnvironmentProblem(f"the lock pins no sdist to build for {', '.join(missing)}")
    wheels: list[Path] = []
    with sandbox(python, uv) as box:
        for name, (url, sha256) in sorted(sdists.items()):
            src = fetch_sdist(url, sha256, box.scratch / "work")
            box.give(src)
            proc = box.run(
                ["build", "--wheel", "--out-dir", str(box.scratch / "out"),
                 "--python", box.python, str(src)],
                env,
            )  # fmt: skip
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                why = lines[-1] if lines else f"exit {proc.returncode}"
                raise EnvironmentProblem(f"building {name} from source (sandboxed) failed: {why}")
        for wheel in sorted((box.scratch / "out").glob("*.whl")):
            dest = out / wheel.name
            shutil.copyfile(wheel, dest)  # ours now: the sandbox's files go with it
            wheels.append(dest)
    return wheels
