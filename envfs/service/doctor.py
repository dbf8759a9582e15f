"""`envfs doctor`: what this node has and lacks for envfs, each finding with a fix.

Checks, in order: the FUSE device and fusermount3, the kernel, uv, the build sandbox (a
build user, unshare and setpriv), the API's user, the interpreters on the
node and in the store, the store (exists, free space, uv cache and staging on one file system
with hardlinks working), the index, envfs mounts (stale ones, propagation), and whether the
daemon may hand views to the kernel (CAP_SYS_ADMIN).  Nothing is changed, except a probe
file linked and removed in the store's staging dir.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from envfs.build import interpreters
from envfs.build.uv import uv_binary, uv_version
from envfs.core.config import Settings
from envfs.core.errors import EnvfsError
from envfs.fs import kernel
from envfs.service.reports import DoctorFinding, DoctorReport
from envfs.store.layout import Store

#: Free space on the store below this is a warning.
LOW_SPACE = 2 << 30
_CAP_SYS_ADMIN = 21


def _ok(name: str, detail: str) -> DoctorFinding:
    return DoctorFinding(name=name, level="ok", detail=detail)


def _warn(name: str, detail: str, hint: str) -> DoctorFinding:
    return DoctorFinding(name=name, level="warn", detail=detail, hint=hint)


def _error(name: str, detail: str, hint: str) -> DoctorFinding:
    return DoctorFinding(name=name, level="error", detail=detail, hint=hint)


def check_fuse() -> list[DoctorFinding]:
    out = []
    try:
        st = os.stat("/dev/fuse")
        if not stat.S_ISCHR(st.st_mode):
            raise OSError(errno.ENODEV, "not a character device")
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
        out.append(_ok("fuse device", "/dev/fuse opens"))
    except OSError as exc:
        hint = "load the fuse module (modprobe fuse); in a container, pass --device /dev/fuse"
        out.append(_error("fuse device", f"/dev/fuse: {exc.strerror}", hint))
    helper = shutil.which("fusermount3")
    if helper is None:
        out.append(_error("fusermount3", "not found", "install fuse3 (scripts/setup does)"))
    else:
        setuid = bool(os.stat(helper).st_mode & stat.S_ISUID)
        detail = f"{helper}" + ("" if setuid else " (not setuid: only root can mount)")
        out.append(_ok("fusermount3", detail))
    release = os.uname().release
    try:
        with open("/proc/filesystems") as f:
            has_fuse = any(line.split()[-1] == "fuse" for line in f if line.strip())
    except OSError:
        has_fuse = False
    if has_fuse:
        out.append(_ok("kernel", f"Linux {release}, FUSE available"))
    else:
        out.append(_error("kernel", f"Linux {release}: no fuse file system", "modprobe fuse"))
    return out


def check_uv() -> DoctorFinding:
    try:
        path = uv_binary()
    except EnvfsError as exc:
        return _error("uv", exc.message, "install uv (scripts/setup does)")
    return _ok("uv", f"uv {uv_version()} at {path}")


def check_interpreters(store: Store | None) -> list[DoctorFinding]:
    found = []
    for path in interpreters.candidates():
        with contextlib.suppress(EnvfsError, OSError):
            found.append(f"{interpreters.probe(path).version} ({path})")
    out = [
        _ok("interpreters on this node", ", ".join(found))
        if found
        else _warn(
            "interpreters on this node",
            "none found",
            "build nodes need one per Python version (pyenv install 3.12); compute nodes need none",
        )
    ]
    if store is not None:
        digests = store.interpreter_digests()
        versions = sorted({store.read_interpreter(d).version for d in digests})
        if versions:
            out.append(_ok("interpreters in the store", ", ".join(versions)))
        else:
            out.append(
                _warn("interpreters in the store", "none yet", "envfs python add 3.12 (once)")
            )
    return out


def check_store(store: Store) -> list[DoctorFinding]:
    if not store.exists():
        hint = "envfs build, envfs bind or envfs python add creates it; check --store"
        return [_warn("store", f"no store at {store.root} yet", hint)]
    out = [_ok("store", str(store.root))]
    vfs = os.statvfs(store.root)
    free = vfs.f_bavail * vfs.f_frsize
    total = vfs.f_blocks * vfs.f_frsize
    detail = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    if free < LOW_SPACE or (total and free / total < 0.05):
        out.append(_warn("free space", detail, "envfs gc; envfs du shows what is used"))
    else:
        out.append(_ok("free space", detail))
    out.append(_check_hardlinks(store))
    return out


def _check_hardlinks(store: Store) -> DoctorFinding:
    """uv's cache and the staging dir must be one file system where links work."""
    name = "hardlinks from the uv cache"
    try:
        store.uv_cache.mkdir(exist_ok=True)
        store.staging.mkdir(exist_ok=True)
        probe = store.uv_cache / f".doctor-{uuid.uuid4().hex[:8]}"
        linked = store.staging / f".doctor-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        try:
            os.link(probe, linked)
            os.unlink(linked)
        finally:
            probe.unlink()
    except OSError as exc:
        hint = "keep uv-cache inside the store, on a file system with hardlinks"
        return _error(name, f"{exc.strerror} ({store.uv_cache} -> {store.staging})", hint)
    return _ok(name, "uv-cache and staging are one file system")


def check_index(settings: Settings, store: Store) -> DoctorFinding:
    if not store.exists():
        return _ok("index", f"{settings.index} (made on first use)")
    from envfs.node.index import open_index

    try:
        index = open_index(settings.index, store)
        count = len(index.all_bindings())
    except (EnvfsError, OSError) as exc:
        hint = "envfs index rebuild (the index is a cache of the store)"
        return _error("index", f"{settings.index}: {exc}", hint)
    return _ok("index", f"{settings.index}: {count} binding(s)")


def check_mounts() -> list[DoctorFinding]:
    from envfs.fs.mounted import is_stale_mount

    out = []
    for m in kernel.mount_table():
        if m.fstype != "fuse.envfs":
            continue
        point = Path(os.fsdecode(m.point))
        if is_stale_mount(point):
            hint = f"envfs mount {point} (removes it first) or envfs umount {point}"
            out.append(_error("mount", f"{point}: stale (its daemon died)", hint))
            continue
        propagation = "shared" if m.shared else "private"
        detail = f"{point}: serving, mount propagation {propagation}"
        if m.shared:
            out.append(_ok("mount", detail))
        else:
            hint = (
                "containers see kernel-served views only if /envs propagates: make its "
                "parent shared (mount --make-rshared /) and use HostToContainer/rslave"
            )
            out.append(_warn("mount", detail, hint))
    if not out:
        out.append(_ok("mount", "no envfs mount on this node (envfs mount /envs)"))
    return out


def check_kernel_views() -> DoctorFinding:
    name = "kernel-served views"
    try:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return _warn(name, "cannot read capabilities", "run the daemon as root")
    if int(caps, 16) >> _CAP_SYS_ADMIN & 1:
        return _ok(name, "CAP_SYS_ADMIN: the daemon binds built envs read-only for the kernel")
    return _warn(
        name,
        "no CAP_SYS_ADMIN: the daemon will serve everything through FUSE (slower)",
        "run envfs mount as root, or with CAP_SYS_ADMIN",
    )


def check_build_sandbox() -> DoctorFinding:
    """Whether source builds can run unprivileged here (`envfs.build.sandbox`)."""
    import pwd

    from envfs.build.sandbox import BUILD_USER

    name = "build sandbox"
    if os.geteuid() != 0:
        return _ok(name, "envfs runs unprivileged: source builds run as this user")
    missing = [t for t in ("unshare", "setpriv") if shutil.which(t) is None]
    if missing:
        return _error(
            name,
            f"no {', '.join(missing)}: a package that needs a source build cannot be built "
            "unprivileged (the build fails)",
            "apt-get install util-linux",
        )
    try:
        pwd.getpwnam(BUILD_USER)
    except KeyError:
        return _warn(
            name,
            f"no user {BUILD_USER}: source builds run as nobody (shared with other services)",
            f"useradd --system --no-create-home --shell /usr/sbin/nologin {BUILD_USER}",
        )
    return _ok(name, f"source builds run as {BUILD_USER}, in a private mount namespace")


def check_api_user() -> DoctorFinding:
    """Whether ``serve-api`` as root has a user of its own for its HTTP side."""
    import pwd

    from envfs.core.config import API_USER

    name = "api user"
    if os.geteuid() != 0:
        return _ok(name, "envfs runs unprivileged: serve-api runs as this user, in one process")
    try:
        pwd.getpwnam(API_USER)
    except KeyError:
        return _warn(
            name,
            f"no user {API_USER}: serve-api's HTTP side runs as nobody (shared with other "
            "services)",
            f"useradd --system --no-create-home --shell /usr/sbin/nologin {API_USER}",
        )
    return _ok(name, f"serve-api's HTTP side runs as {API_USER}")


def diagnose(settings: Settings, say: Callable[[str], None] | None = None) -> DoctorReport:
    store = Store(settings.store)
    findings: list[DoctorFinding] = []
    steps: list[Callable[[], list[DoctorFinding]]] = [
        check_fuse,
        lambda: [check_uv()],
        lambda: [check_build_sandbox(), check_api_user()],
        lambda: check_store(store),
        lambda: check_interpreters(store if store.exists() else None),
        lambda: [check_index(settings, store)],
        check_mounts,
        lambda: [check_kernel_views()],
    ]
    for step in steps:
        got = step()
        findings += got
        if say is not None:
            for f in got:
                say(f"doctor: {f.name}: {f.level}")
    return DoctorReport(ok=all(f.level != "error" for f in findings), findings=findings)
