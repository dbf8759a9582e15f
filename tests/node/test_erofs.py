"""A snapshot's names as an EROFS image of metacopy stubs (`envfs.node.erofs`), mounted by
the kernel under an overlay whose data-only layer holds the bytes."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from envfs.fs import kernel
from envfs.node.erofs import BLOCK, write_image
from envfs.store.files import Listing, ListingEntry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

MTIME = 946_684_800


def _listing(root: Path) -> Listing:
    """A directory's entries as a snapshot's listing."""
    listing: Listing = {}
    for top, dirs, files in os.walk(root):
        rel = os.fsencode(os.path.relpath(top, root)) if top != str(root) else b""
        entries = listing.setdefault(rel, {})
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(os.path.join(top, name))
                entry = ListingEntry("symlink", 0o777, len(target), None, target)
            elif stat.S_ISDIR(st.st_mode):
                entry = ListingEntry("dir", stat.S_IMODE(st.st_mode), 0, None, None)
            else:
                entry = ListingEntry("file", stat.S_IMODE(st.st_mode), st.st_size, "0" * 64, None)
            entries[os.fsencode(name)] = entry
    return listing


def _seen(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every name below ``root``: its kind, permission bits and size (files)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            size = st.st_size if kind != "d" else 0
            out[os.path.relpath(path, root)] = (kind, stat.S_IMODE(st.st_mode), size)
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A tree with what an env has: nested packages, a directory of more names than one
    block of entries holds, empty and executable files, symlinks, a file past 4 GiB."""
    root = tmp_path / "data"
    pkg = root / "lib/python3.12/site-packages/pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "empty.py").write_bytes(b"")
    (pkg / "sub").mkdir()
    (pkg / "sub/mod.py").write_text("import os\n" * 300)
    many = root / "lib/python3.12/many"
    many.mkdir()
    for i in range(400):  # ~8 KB of entries: three blocks
        (many / f"module_with_a_long_name_{i:04d}.py").write_text(f"N = {i}\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "bin/tool", 0o755)
    os.symlink("tool", root / "bin/alias")
    os.symlink("../lib/python3.12", root / "bin/lib-link")
    with open(root / "huge.bin", "wb") as f:
        f.truncate((5 << 30) + 123)  # sparse: a compact inode's 32-bit size would not do
    for d in (pkg, pkg / "sub", many, root / "bin", root / "lib", root / "lib/python3.12"):
        os.chmod(d, 0o555)
    return root


def test_the_image_names_everything_and_the_data_layer_gives_the_bytes(
    data: Path, tmp_path: Path
) -> None:
    image = tmp_path / "names.erofs"
    size = write_image(image, _listing(data), 1234, 5678, MTIME)
    assert size == image.stat().st_size and size % BLOCK == 0
    assert size < 200 * BLOCK  # names only: not the 5 GiB
    top, view = tmp_path / "top", tmp_path / "view"
    top.mkdir()
    view.mkdir()
    with kernel.image_mounted(image) as names:
        fd = int(names.rsplit("/", 1)[1])  # the image's root, as ls(1) reads it with readdir(3)
        listed = subprocess.run(
            ["ls", "-a", names], capture_output=True, text=True, check=True, pass_fds=(fd,)
        )
        assert listed.stdout.split() == [".", "..", "bin", "huge.bin", "lib"]  # none numbered 0
        kernel.overlay_read_only([top, names], view, data=[data])
    try:
        assert _seen(view) == _seen(data)
        module = "lib/python3.12/site-packages/pkg/sub/mod.py"
        st = os.stat(view / module)
        assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (1234, 5678, MTIME)
        assert (view / module).read_bytes() == (data / module).read_bytes()
        assert (view / "bin/tool").read_text() == "#!/bin/sh\necho hi\n"
        assert os.access(view / "bin/tool", os.X_OK)
        assert os.readlink(view / "bin/alias") == "tool"
        assert (view / "bin/lib-link/many/module_with_a_long_name_0399.py").read_text() == (
            "N = 399\n"
        )
        assert (view / "lib/python3.12/site-packages/pkg/empty.py").read_bytes() == b""
        assert os.stat(view / "huge.bin").st_size == (5 << 30) + 123
        with pytest.raises(FileNotFoundError):
            os.stat(view / "lib/python3.12/site-packages/pkg/__init__.so")
        many = sorted(os.listdir(view / "lib/python3.12/many"))
        assert many == sorted(os.listdir(data / "lib/python3.12/many")) and len(many) == 400
        for name in (many[0], many[170], many[-1]):  # found in each block of entries
            assert os.stat(view / "lib/python3.12/many" / name).st_size == len(
                (data / "lib/python3.12/many" / name).read_bytes()
            )
        with pytest.raises(OSError) as refused:
            (view / "new.txt").write_text("x")
        assert refused.value.errno == errno.EROFS
    finally:
        kernel.detach(view)


def test_a_damaged_image_is_refused_with_nothing_mounted(data: Path, tmp_path: Path) -> None:
    image = tmp_path / "names.erofs"
    write_image(image, _listing(data), 0, 0, MTIME)
    with open(image, "r+b") as f:  # the superblock's magic
        f.seek(1024)
        f.write(b"\0\0\0\0")
    before = kernel.mount_table()
    with pytest.raises(OSError, match="erofs mount"), kernel.image_mounted(image):
        pass
    assert kernel.mount_table() == before


def test_an_early_overlay_goes_on_without_an_image_the_kernel_refuses(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A names image that does not mount (damaged) is removed and the early overlay is
    made over the view alone, as before images: every name still there, from the view."""
    from envfs.fs.kernel_views import early_overlay
    from envfs.node.cache import NodeCache
    from envfs.node.early import EarlyTree

    tree = EarlyTree(NodeCache(tmp_path / "cache"), "s" * 64, tmp_path / "tree")
    tree.path.mkdir()
    image = tree.image = tmp_path / "tree.erofs"
    write_image(image, _listing(data), 0, 0, MTIME)
    with open(image, "r+b") as f:  # the superblock's magic
        f.seek(1024)
        f.write(b"\0\0\0\0")
    before = _seen(data)
    early_overlay(tree, data)  # on the view itself, as a daemon places it
    try:
        assert data in kernel.mounts_under(tmp_path)
        assert "the names image of ssssssssssss is not used" in caplog.text
        assert tree.image is None and not image.exists()
        assert _seen(data) == before
    finally:
        kernel.detach(data)
