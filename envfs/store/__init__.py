"""The store: the shared directory that is the source of truth, and every format on it.

``layout`` (paths, atomic files, bindings and revisions, leases, the object pool, the gc
fence), ``feed`` (the per-host change logs), ``gc`` (sweeping what nothing needs),
``verify`` (snapshots against manifests, uv's cache against RECORDs), ``wheel`` (a
wheel's RECORD).

May import: ``envfs.core`` and ``envfs.model``; never the build, the node, the file system
or the faces. It knows no kernel and prints nothing.
"""
