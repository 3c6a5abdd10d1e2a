"""``shardshift doctor``: what failed moves left behind, and ``--repair``."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from activities.doctor import Doctor, MoveProbe, PlanProbe
from activities.doctor_findings import format_report
from catalog import Catalog
from cli.common import CliError, catalog_dsn
from cli.temporal import client as temporal_client
from settings import get_settings
from shards.errors import InvalidNameError
from shards.names import check_collection
from shards.staging import Staging
from worker import TemporalMoveProbe


def cmd_doctor(args: argparse.Namespace) -> int:
    return asyncio.run(_doctor(args))


async def _doctor(args: argparse.Namespace) -> int:
    for name in args.collection or []:
        try:
            check_collection(name)
        except InvalidNameError as exc:
            raise CliError(str(exc)) from None
    settings = get_settings()
    probe: MoveProbe
    plans: PlanProbe
    try:
        client = await temporal_client(settings)
    except CliError as exc:
        # Without Temporal nothing can be proven dead: every active migration counts as
        # running (and is reported), everything else is still examined.
        reason = str(exc)

        async def unreachable(record: Any, workflow_ids: Any) -> bool:
            raise RuntimeError(reason)

        async def plan_unknown(plan_id: str) -> bool:
            raise RuntimeError(reason)

        async def drains_unknown() -> set[str]:
            raise RuntimeError(reason)

        probe, plans, drains = unreachable, plan_unknown, drains_unknown
    else:
        temporal_probe = TemporalMoveProbe(client)
        probe, plans = temporal_probe, temporal_probe.plan_running
        drains = temporal_probe.draining_shards
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        doctor = Doctor(cat, Staging.from_settings(settings), probe, collections=args.collection,
                        db=settings.db, plan_running=plans, drains_running=drains)
        report = await doctor.run(repair=args.repair)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(format_report(report, repair=args.repair), end="")
    return 0 if report.clean else 1
