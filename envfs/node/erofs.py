"""A snapshot's names without their bytes: an EROFS image of overlayfs metacopy stubs.

A fresh node's first import asks for many names whose bytes it never reads: Python stats a
module's source before it reads its bytecode, tries ``__init__`` with each extension
suffix, lists the directories it imports from. In the early overlay (`envfs.node.early`)
each name the node does not hold was a lookup (and a ``getxattr``) through FUSE: pandas,
~1,100 round trips to the daemon. This image holds every name of the snapshot, with its
mode, size and owner, and no data: each regular file is a *metacopy stub* (an EROFS
chunk-based file whose one chunk is a hole, with ``trusted.overlay.metacopy`` and an
absolute ``trusted.overlay.redirect`` to its own path), the way composefs does it. Mounted
between the early tree and the FUSE view, which overlayfs then takes as a *data-only*
layer (``lowerdir=early:image::view``, ``metacopy=on``), the kernel answers every
lookup, stat and listing from the image; FUSE is asked only for the bytes of a file opened
that the node does not hold (one lookup of its path, its open and reads).

The image is written on the node, from the manifest the daemon has read anyway, into the
node cache (nothing on the NAS: an image per snapshot would share nothing between envs);
the kernel mounts the file itself (erofs is file-backed on this kernel: no loop device).

Format (Linux ``fs/erofs/erofs_fs.h``): 4 KiB blocks; the superblock at 1024; inodes from
block 1 (``meta_blkaddr``), each 32-byte compact (64-byte extended for a file of 4 GiB or
more) with its xattrs inline and, for a stub, its one-entry block map (``EROFS_NULL_ADDR``:
a hole) or, for a symlink, its target inline; then each directory's blocks of dirents,
sorted by name. Compact inodes take their mtime from the superblock's ``build_time``: every
file of a snapshot has the same one (as FUSE gives them: `envfs.fs.inodes`). No checksum (the
image never leaves the node that wrote it)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from envfs.store.files import Listing, ListingEntry

BLOCK = 4096
_BLOCK_BITS = 12
_SUPER_OFFSET = 1024
_MAGIC = 0xE0F5E1E2
_INCOMPAT_CHUNKED_FILE = 0x4
_META_BLKADDR = 1
_FLAT_PLAIN, _FLAT_INLINE, _CHUNK_BASED = 0, 2, 4
_XATTR_TRUSTED = 4
_NULL_ADDR = 0xFFFFFFFF
_FILE_TYPE = {"file": 1, "dir": 2, "symlink": 7}
_S_IFMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
_COMPACT = struct.Struct("<HHHHIIIIHHI")  # 32 bytes
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")  # 64 bytes
_DIRENT = struct.Struct("<QHBx")  # 12 bytes
#: a stub's xattrs up to its redirect's value: the header (no shared xattrs), the empty
#: ``trusted.overlay.metacopy``, the entry of ``trusted.overlay.redirect`` and its name
_XATTRS_HEAD = b"".join((
    struct.pack("<IB7x", 0, 0),
    struct.pack("<BBH", len(b"overlay.metacopy"), _XATTR_TRUSTED, 0), b"overlay.metacopy",
    struct.pack("<BB", len(b"overlay.redirect"), _XATTR_TRUSTED),
))  # fmt: skip
_REDIRECT = struct.Struct("<H")  # then "overlay.redirect" and the value, padded to 4


class _Node:
    __slots__ = ("children", "entry", "ino", "nid", "parent_nid", "record", "rel")

    def __init__(self, rel: bytes, entry: ListingEntry, ino: int) -> None:
        self.rel, self.entry, self.ino = rel, entry, ino
        self.nid = 0
        self.record = b""  # the inode and what follows it inline
        self.children: list[tuple[bytes, _Node]] = []
        self.parent_nid = 0


def write_image(path: Path, listing: Listing, uid: int, gid: int, mtime: int) -> int:
    """Write the image of ``listing`` (every file a stub redirecting to its own path, owned
    by ``uid``:``gid``, modified at ``mtime`` seconds) to ``path`` (atomically); its size."""
    who = (uid, gid, mtime)
    nodes = _nodes(listing)
    for node in nodes:
        node.record = _record(node, who)
    block = _place_inodes(nodes)
    dir_blocks: list[tuple[int, list[bytes]]] = []
    for node in nodes:
        if node.entry.type == "dir":  # its blocks, then its inode (which says where they are)
            blocks = _dirents(node)
            size = (len(blocks) - 1) * BLOCK + len(blocks[-1])
            subdirs = sum(child.entry.type == "dir" for _name, child in node.children)
            node.record = _inode(node, 2 + subdirs, size, block, _FLAT_PLAIN, 0, who)
            dir_blocks.append((block, blocks))
            block += len(blocks)
    out = bytearray(block * BLOCK)
    struct.pack_into(
        "<IIIBBHQQIIII16s16sIHHHBBIQB23x",
        out,
        _SUPER_OFFSET,
        _MAGIC, 0, 0, _BLOCK_BITS, 0, nodes[0].nid, len(nodes), mtime, 0, block, _META_BLKADDR,
        0, b"", b"envfs", _INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    for node in nodes:
        at = _META_BLKADDR * BLOCK + node.nid * 32
        out[at : at + len(node.record)] = node.record
    for first, blocks in dir_blocks:
        for i, data in enumerate(blocks):
            at = (first + i) * BLOCK
            out[at : at + len(data)] = data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(out)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(out)


def _place_inodes(nodes: list[_Node]) -> int:
    """Give each node its nid: records 32-byte aligned from the metadata block on, none
    across a block (nid 0 left out: a directory entry numbered 0 is one readdir(3)
    skips); the first block after them."""
    pos = _META_BLKADDR * BLOCK + 32
    for node in nodes:
        size = len(node.record)
        if pos // BLOCK != (pos + size - 1) // BLOCK and size <= BLOCK:
            pos = -(-pos // BLOCK) * BLOCK
        node.nid = (pos - _META_BLKADDR * BLOCK) // 32
        pos += -(-size // 32) * 32
    nodes[0].parent_nid = nodes[0].nid  # the root's ".." is itself
    for node in nodes:
        for _name, child in node.children:
            child.parent_nid = node.nid
    return -(-pos // BLOCK)


def _nodes(listing: Listing) -> list[_Node]:
    """Every entry of ``listing``, the root first (its nid must fit the superblock's 16
    bits), each directory's children linked."""
    root = _Node(b"", ListingEntry("dir", stat.S_IFDIR | 0o555, 0, None, None), 1)
    nodes = [root]
    todo = [root]
    while todo:
        node = todo.pop()
        for name, entry in sorted(listing.get(node.rel, {}).items()):
            if entry.type not in _FILE_TYPE:
                continue
            child = _Node(node.rel + b"/" + name if node.rel else name, entry, len(nodes) + 1)
            nodes.append(child)
            node.children.append((name, child))
            if entry.type == "dir":
                todo.append(child)
    return nodes


def _record(node: _Node, who: tuple[int, int, int]) -> bytes:
    """A file's or symlink's inode with what follows it inline (a directory's: a placeholder
    of its size, made once its blocks are placed)."""
    entry = node.entry
    if entry.type == "dir":
        return bytes(_COMPACT.size)
    if entry.type == "symlink":
        target = os.fsencode(entry.target or "")
        return _inode(node, 1, len(target), 0, _FLAT_INLINE, 0, who) + target
    if entry.size == 0:  # nothing to redirect to: an empty file as it is
        return _inode(node, 1, 0, 0, _FLAT_PLAIN, 0, who)
    redirect = b"/" + node.rel
    value = b"".join((_REDIRECT.pack(len(redirect)), b"overlay.redirect", redirect))
    xattrs = _XATTRS_HEAD + value + bytes(-(2 + len(value)) % 4)  # (its entry's head: 4)
    chunk_bits = min(31, max(0, (entry.size - 1).bit_length() - _BLOCK_BITS))  # one chunk
    icount = (len(xattrs) - 12) // 4 + 1
    inode = _inode(node, 1, entry.size, chunk_bits, _CHUNK_BASED, icount, who)
    return inode + xattrs + struct.pack("<I", _NULL_ADDR)


def _inode(
    node: _Node, nlink: int, size: int, u: int, layout: int, icount: int, who: tuple[int, int, int]
) -> bytes:
    """An inode (compact unless its size or owner needs the extended one); ``u``: its block
    address or chunk format; ``who``: its owner and mtime."""
    uid, gid, mtime = who
    kind = node.entry.type
    mode = _S_IFMT[kind] | (0o777 if kind == "symlink" else stat.S_IMODE(node.entry.mode))
    if size < 1 << 32 and uid < 1 << 16 and gid < 1 << 16:
        return _COMPACT.pack(layout << 1, icount, mode, nlink, size, 0, u, node.ino, uid, gid, 0)
    fields = (icount, mode, 0, size, u, node.ino, uid, gid, mtime, 0, nlink)
    return _EXTENDED.pack(layout << 1 | 1, *fields)


def _dirents(node: _Node) -> list[bytes]:
    """A directory's blocks of dirents (``.`` and ``..`` with its children, by name)."""
    entries = [(b".", node.nid, 2), (b"..", node.parent_nid, 2)]
    entries += [(name, child.nid, _FILE_TYPE[child.entry.type]) for name, child in node.children]
    entries.sort()
    blocks: list[bytes] = []
    chunk: list[tuple[bytes, int, int]] = []
    used = 0
    for item in entries:
        need = _DIRENT.size + len(item[0])
        if chunk and used + need > BLOCK:
            blocks.append(_block(chunk, pad=True))
            chunk, used = [], 0
        chunk.append(item)
        used += need
    blocks.append(_block(chunk, pad=False))
    return blocks


def _block(entries: list[tuple[bytes, int, int]], pad: bool) -> bytes:
    nameoff = _DIRENT.size * len(entries)
    heads, names = [], []
    for name, nid, kind in entries:
        heads.append(_DIRENT.pack(nid, nameoff, kind))
        names.append(name)
        nameoff += len(name)
    data = b"".join(heads) + b"".join(names)
    return data.ljust(BLOCK, b"\0") if pad else data
