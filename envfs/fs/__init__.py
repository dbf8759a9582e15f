"""The file system: the namespace of ``/envs`` as plain Python (``vfs``, no pyfuse3; its
``inodes`` and the cost of ``misses``), the seam it asks (``catalog``), the pyfuse3
adapter (``fuse_ops``) and its trio loop (``fuse_loop``), reads that must not block the
loop (``nowait``), kernel-served views (``kernel``), the daemon that mounts it all
(``mount``) and its status file (``status``), and mounts seen from outside it
(``mounted``).

May import: ``envfs.core``, ``envfs.store`` and ``envfs.node``; never the
build package, the service or the faces (the daemon is handed a `Catalog`). Only
``fuse_ops``, ``fuse_loop`` and ``mount`` import pyfuse3.
"""
