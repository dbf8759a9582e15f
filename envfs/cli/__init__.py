"""The admin CLI face (click): every command parses, calls the service, prints; every error
is one line on stderr and a documented exit code (``envfs.core.errors``).

``app`` is the ``envfs`` group (global options, error handling); one module per command
group registers its commands on it: ``envs`` (build, bind, ls, show, history, rollback, rm,
diff, resolve, run), ``upkeep`` (du, verify, gc, index), ``pythons`` (python add/ls),
``serving`` (mount, umount, status, serve-api), ``travel`` (export, import), ``acl``
(set, show, rm), ``doctor``.

May import: ``envfs.service`` and everything below it, and ``envfs.api`` (serve-api).
"""

from envfs.cli import acl, doctor, envs, pythons, serving, travel, upkeep
from envfs.cli.app import main, run

__all__ = ["acl", "doctor", "envs", "main", "pythons", "run", "serving", "travel", "upkeep"]
