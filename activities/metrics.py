"""OpenTelemetry instruments of a move, recorded by its activities (never by workflow code,
which must stay deterministic). No-ops until ``infra.telemetry.setup`` installs a
MeterProvider. Names, units and labels: docs/telemetry.md."""

from __future__ import annotations

import logging

from opentelemetry import metrics

from infra.telemetry import SECONDS_BUCKETS, LiveGauge

log = logging.getLogger("shardshift.move")
"""One line per milestone of a move (import done, verified, cut over, finished); with
``--log-format json`` each carries the workflow, activity and migration ids."""

_meter = metrics.get_meter("shardshift.move")

rows_copied = _meter.create_counter(
    "shardshift.move.rows_copied", unit="{row}",
    description="Rows of a chunk's snapshot imported into the target (each part counted once, "
                "by the attempt that committed it)",
)
copy_rate = LiveGauge(
    "shardshift.move.copy.rate", unit="{row}/s",
    description="Import rate of a running bulk import (rows committed by this attempt / its "
                "elapsed time); the series goes away a minute after the import ends",
)
replication_lag_bytes = LiveGauge(
    "shardshift.move.replication.lag_bytes", unit="By",
    description="WAL the target's applier still has to apply (last sample of a running move)",
)
replication_lag = LiveGauge(
    "shardshift.move.replication.lag", unit="s",
    description="Age of the oldest source commit not yet applied on the target (last sample)",
)
cutover_pause = _meter.create_histogram(
    "shardshift.move.cutover.pause", unit="s",
    description="Writes to the chunk paused by a committed cutover (freeze to catalog switch)",
    explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS),
)
verify_mismatches = _meter.create_counter(
    "shardshift.move.verify.mismatches", unit="{bucket}",
    description="Checksum buckets that differed between source and target in verify's first round",
)
verify_repairs = _meter.create_counter(
    "shardshift.move.verify.repairs", unit="{range}",
    description="Key ranges re-copied from the source by verify",
)
moves = _meter.create_counter(
    "shardshift.move.finished", unit="{move}",
    description="Moves finished, by outcome (completed, rolled_back, aborted, failed) and kind",
)
