"""The use cases the faces (CLI, API) call: resolve inputs to a spec, bind, build, show,
roll back, remove, verify, measure (``envs``: `Service`, and `StoreCatalog`, the daemon's
view of it), and the node check (``doctor``).

May import: every package below it (``envfs.store``, ``envfs.build``, ``envfs.node``,
``envfs.fs``, ``envfs.core``, ``envfs.model``); never the faces.
"""
