"""``python -m cli``: the ``shardshift`` command."""

import sys

from cli.main import main

sys.exit(main())
