"""``shardshift worker``: a Temporal worker hosting every workflow and activity."""

from __future__ import annotations

import argparse

from worker import main as worker_main


def cmd_worker(args: argparse.Namespace) -> int:
    worker_main(metrics_port=args.metrics_port, log_format=args.log_format)
    return 0
