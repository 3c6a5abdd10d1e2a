"""``shardshift setup temporal [--namespace N]``: make a Temporal namespace ready for
shardshift's workflows.

The workflows upsert the custom search attributes of ``settings.SEARCH_ATTRIBUTES``
(``ShardshiftPhase`` and the others); a namespace without them fails those upserts, so moves
would not run. The local stack's dev server registers them at start on its own namespace;
this command registers them on any namespace through the operator service
(``AddSearchAttributes``). Idempotent: attributes already there are left alone; one there
with another type is an error (nothing is changed then).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.service import RPCError, RPCStatusCode

from cli.common import CliError
from cli.temporal import client as temporal_client
from settings import SEARCH_ATTRIBUTES, get_settings


def _type(kind: str) -> IndexedValueType.ValueType:
    return IndexedValueType.Value("INDEXED_VALUE_TYPE_" + kind.upper())


def cmd_setup(args: argparse.Namespace) -> int:
    return asyncio.run(_setup_temporal(args))


async def _setup_temporal(args: argparse.Namespace) -> int:
    settings = get_settings()
    namespace = args.namespace or settings.temporal.namespace
    client = await temporal_client(settings)
    ops = client.operator_service
    try:
        listed = await ops.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"namespace {namespace!r} does not exist on "
                           f"{settings.temporal.address} (create it: temporal operator "
                           f"namespace create --namespace {namespace})") from None
        raise
    have = dict(listed.custom_attributes)
    wrong = {n: IndexedValueType.Name(have[n]) for n, k in SEARCH_ATTRIBUTES.items()
             if n in have and have[n] != _type(k)}
    if wrong:
        raise CliError(f"namespace {namespace!r} has {sorted(wrong)} with another type "
                       f"({wrong}); shardshift needs {SEARCH_ATTRIBUTES} (nothing changed)")
    missing = {n: _type(k) for n, k in SEARCH_ATTRIBUTES.items() if n not in have}
    if missing:
        await ops.add_search_attributes(AddSearchAttributesRequest(
            search_attributes=missing, namespace=namespace))
        listed = await ops.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
        absent = sorted(set(missing) - set(listed.custom_attributes))
        if absent:
            raise CliError(f"Temporal accepted but does not list {absent} on {namespace!r} "
                           "yet (run this again in a moment)")
    present = sorted(set(SEARCH_ATTRIBUTES) - set(missing))
    if args.json:
        print(json.dumps({"namespace": namespace, "added": sorted(missing),
                          "present": present}, indent=2))
    elif missing:
        print(f"namespace {namespace}: registered {', '.join(sorted(missing))}"
              + (f" (already there: {', '.join(present)})" if present else ""))
    else:
        print(f"namespace {namespace}: every shardshift search attribute is already registered "
              f"({', '.join(present)})")
    return 0
