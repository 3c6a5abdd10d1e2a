"""``shardshift collection create``: a collection in the catalog and on its shards."""

from __future__ import annotations

import argparse
import asyncio

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.errors import CatalogError
from catalog.local_stack import close_engines, open_engines, register_stack_shards
from cli.common import CliError, catalog_dsn
from cli.render import print_chunk_map
from infra import Stack
from settings import get_settings
from shards.errors import InvalidNameError
from shards.models import IndexDefinition
from shards.names import check_collection, check_field_path


def _index(spec: str) -> IndexDefinition:
    name, sep, fields = spec.partition(":")
    if not sep or not name or not fields:
        raise CliError(f"invalid --index {spec!r}: expected name:field[,field...]")
    try:
        return IndexDefinition(name=name, fields=tuple(f for f in fields.split(",") if f))
    except ValueError as exc:
        raise CliError(f"invalid --index {spec!r}: {exc}".replace("\n", " ")) from exc


def cmd_collection(args: argparse.Namespace) -> int:
    return asyncio.run(_collection_create(args))


async def _collection_create(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:  # bad input changes nothing: checked before the stack's shards are registered
        check_collection(args.name)
        check_field_path(args.shard_key)
    except InvalidNameError as exc:
        raise CliError(f"cannot create collection {args.name!r}: {exc}") from None
    if args.chunks_per_shard < 1:
        raise CliError(f"--chunks-per-shard {args.chunks_per_shard}: expected at least 1")
    indexes = [_index(s) for s in args.index or []]
    wanted = [s for s in (args.shards or "").split(",") if s] or None
    stack = Stack.from_settings(settings)
    async with Catalog(catalog_dsn(settings), max_size=4) as cat:
        await cat.ensure_schema()
        if stack.record() is not None:
            await register_stack_shards(cat, stack)
        registered = {s.shard_id: s for s in await cat.list_shards()}
        if wanted:
            missing = sorted(set(wanted) - set(registered))
            if missing:
                raise CliError(f"unknown shards {missing}; registered: {sorted(registered)}")
            ids = wanted
        else:
            ids = sorted(s.shard_id for s in registered.values() if s.state.value == "active")
        if not ids:
            raise CliError("no shards registered in the catalog (run: shardshift infra up)")
        engines = await open_engines([registered[i] for i in ids], max_size=2, db=settings.db)
        try:
            cmap = await provision_collection(
                cat, engines, args.name, args.shard_key, indexes,
                chunks_per_shard=args.chunks_per_shard,
            )
        except (CatalogError, ValueError) as exc:
            raise CliError(f"cannot create collection {args.name!r}: {exc}") from exc
        finally:
            await close_engines(engines)
    print_chunk_map(args.name, args.shard_key, cmap)
    return 0
