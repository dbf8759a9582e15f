"""The store: the shared directory that is the source of truth, and every format on it.

``layout`` (`Store`: specs, snapshots, interpreters, failures, trash) over ``base``
(directories, atomic files, records), ``bindings`` (revisions), ``pool`` (the content
pool), ``leases`` (build leases, the gc fence, serve leases) and ``files`` (trees,
listings); ``feed`` (the per-host change logs), ``gc`` (sweeping what nothing needs),
``verify`` (snapshots against manifests, uv's cache against RECORDs), ``wheel`` (a wheel's
RECORD), ``formats`` (the pydantic model of each file on it).

May import: ``envfs.core`` only; never the build, the node, the file system or the faces.
It knows no kernel and prints nothing.
"""
