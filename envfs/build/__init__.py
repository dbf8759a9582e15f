"""Building snapshots: specs and locking (``spec``), where packages may come from
(``sources``), running uv (``uv``), the build itself (``builder``), the tree it leaves
(``tree``: relocatable scripts, the pool, the manifest scan, RECORD checks), bytecode
through the store's pool (``bytecode``), interpreters found on this node
(``interpreters``), captured into the store (``capture``) and made relocatable
(``relocate``), and Ray driver pinning (``raydriver``).

May import: ``envfs.core`` and ``envfs.store``; never the node, the file
system or the faces.
"""
