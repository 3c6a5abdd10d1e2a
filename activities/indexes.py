"""Index DDL: build or drop a collection's secondary indexes on its shards, then record them.

Runs on a worker because building an index is DDL, which only the mover's role may run on a
shard (the router's role reads and writes documents only: docs/security.md). The MongoDB
front end starts ``ChangeIndexesWorkflow`` for ``createIndexes``/``dropIndexes``, and the
workflow runs this one activity. ``catalog.admin.change_indexes`` holds the exclusion with
moves: the collection's catalog row stays locked while the shards change, a live move of one
of its chunks refuses the change (``ChunkBusy``, not retried), and a move registered meanwhile
waits, then builds its target with the new indexes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from temporalio import activity

from activities.context import MoveContext, non_retryable
from catalog import CatalogError
from catalog.admin import change_indexes
from catalog.errors import CatalogUnavailableError, ChunkBusyError, UnknownCollectionError
from shards.errors import InvalidNameError
from shards.models import IndexDefinition


class IndexChange(BaseModel):
    """Indexes to build and index names to drop on one collection."""

    model_config = ConfigDict(frozen=True)

    collection: str
    create: list[IndexDefinition] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)


class IndexChangeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    indexes: list[IndexDefinition]
    """The collection's secondary indexes after the change, as the catalog lists them."""


class IndexActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="indexes.change")
    async def change(self, inp: IndexChange) -> IndexChangeResult:
        """Build/drop on every shard holding a chunk, then commit to the catalog. Idempotent
        (``CREATE INDEX IF NOT EXISTS``, ``DROP INDEX IF EXISTS``)."""
        activity.heartbeat(f"{inp.collection}: +{[i.name for i in inp.create]} "
                           f"-{inp.drop}")
        try:
            info = await change_indexes(self.ctx.catalog, self.ctx.engine, inp.collection,
                                        create=inp.create, drop=inp.drop)
        except ChunkBusyError as exc:
            raise non_retryable(exc, f"{inp.collection}: index change refused") from exc
        except (UnknownCollectionError, InvalidNameError, ValueError) as exc:
            raise non_retryable(exc, f"{inp.collection}: index change refused") from exc
        except CatalogUnavailableError:
            raise  # the catalog may come back: Temporal retries the activity
        except CatalogError as exc:
            raise non_retryable(exc, f"{inp.collection}: index change failed") from exc
        return IndexChangeResult(indexes=list(info.indexes))
