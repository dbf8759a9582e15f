"""The HTTP API face (``envfs serve-api``): routes and auth over the service (``server``),
the bodies and answers it documents (``models``), its metrics (``metrics``), uvicorn with
its limits (``wire``), and the audit of mutations into PostgreSQL through a local spool
(``audit``).

May import: ``envfs.service`` and everything below it; never the CLI.
"""
