"""``python -m cli``: the ``shardshift`` command."""

from cli.app import run

run()
