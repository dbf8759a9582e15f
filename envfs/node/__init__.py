"""What lives on one compute node: the LMDB index of the store (``index``, the only lmdb
importer with its background ``sweep``; ``records``: its keys and values), the node cache
that rides out store outages (``cache``), and the queue of builds started by first
accesses (``builds``).

May import: ``envfs.core`` and ``envfs.store``; never the build package,
the file system or the faces.
"""
