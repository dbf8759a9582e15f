"""The HTTP API face (``envfs serve-api``): routes, auth, limits and metrics over the
service (``server``), and the audit of mutations into PostgreSQL through a local spool
(``audit``).

May import: ``envfs.service`` and everything below it; never the CLI.
"""
