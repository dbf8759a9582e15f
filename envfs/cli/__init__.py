"""The admin CLI face (click): every command parses, calls the service, prints; every error
is one line on stderr and a documented exit code (``envfs.core.errors``).

May import: ``envfs.service`` and everything below it; never the API.
"""

from envfs.cli.app import main, run

__all__ = ["main", "run"]
