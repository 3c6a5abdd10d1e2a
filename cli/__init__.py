"""The ``shardshift`` command line (``cli.app.main``).

``cli.app`` builds the parser and maps errors to exit codes; each command lives in its own
module (``infra``, ``router``, ``worker``, ``collection``, ``moves``, ``fleet``, ``doctor``,
``demo``), imported only when that command runs. ``render`` formats what they print,
``temporal`` connects to Temporal and watches workflows, ``common`` holds what they share.
"""

from cli.app import main, run

__all__ = ["main", "run"]
