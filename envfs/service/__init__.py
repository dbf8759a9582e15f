"""The use cases the faces (CLI, API) call: resolve inputs to a spec, bind, show, roll
back, remove, verify, measure (``envs``: `Service`, `Inputs`), building once across nodes
(``building``), what they stand on (``base``), the daemon's catalog over them (``catalog``)
and the node check (``doctor``).

May import: every package below it (``envfs.store``, ``envfs.build``, ``envfs.node``,
``envfs.fs``, ``envfs.core``); never the faces.
"""
