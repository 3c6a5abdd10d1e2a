"""``python -m cli``: the ``shardshift`` command."""

import sys

from cli.app import main

sys.exit(main())
