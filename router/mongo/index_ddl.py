"""Who runs index DDL for the MongoDB front end.

The router's database role cannot run DDL (docs/security.md), so ``createIndexes`` and
``dropIndexes`` hand the change to a worker: ``TemporalIndexDdl`` starts the worker's
``ChangeIndexesWorkflow`` (by name: the router sits below the workflows) with the workflow id
``indexes-<collection>`` and waits for its result. The worker builds or drops the index on
every shard that holds the collection, then records the definition in the catalog; the
router's chunk map follows the catalog's change notification.

Without a runner (``ServerContext.state["index_ddl"]`` unset) the index commands that would
change something answer ``CommandNotSupported`` with what to configure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, FailureError, WorkflowAlreadyStartedError

from router.mongo.errors import MongoError
from shards.models import IndexDefinition

STATE_KEY = "index_ddl"
DEFAULT_WAIT_S = 600.0
"""How long a client waits for an index change unless its ``maxTimeMS`` says otherwise."""
WORKFLOW = "ChangeIndexesWorkflow"


class IndexDdl(Protocol):
    async def change(self, collection: str, create: list[IndexDefinition],
                     drop: list[str], *, wait_s: float = ...) -> list[IndexDefinition]:
        """Build ``create`` and drop ``drop`` everywhere; the indexes the catalog lists now.
        Gives up waiting (not the change) after ``wait_s``: MaxTimeMSExpired."""
        ...


def _root(exc: WorkflowFailureError) -> BaseException:
    """The application error under a failed workflow (workflow -> activity -> application)."""
    cur: BaseException = exc.cause
    while (isinstance(cur, FailureError) and not isinstance(cur, ApplicationError)
           and cur.cause is not None):
        cur = cur.cause
    return cur


class TemporalIndexDdl:
    """Runs index changes as ``ChangeIndexesWorkflow`` on the workers' task queue."""

    def __init__(self, connect: Callable[[], Awaitable[Client]], task_queue: str) -> None:
        self._connect = connect
        self._client: Client | None = None
        self.task_queue = task_queue

    async def _client_now(self) -> Client:
        if self._client is None:
            try:
                self._client = await self._connect()
            except Exception as exc:
                raise MongoError("HostUnreachable",
                                 f"index DDL runs on a worker, and Temporal could not be "
                                 f"reached: {exc}") from exc
        return self._client

    async def change(self, collection: str, create: list[IndexDefinition],
                     drop: list[str], *, wait_s: float = DEFAULT_WAIT_S
                     ) -> list[IndexDefinition]:
        client = await self._client_now()
        arg: dict[str, Any] = {"collection": collection,
                               "create": [i.model_dump(mode="json") for i in create],
                               "drop": drop}
        try:
            handle = await client.start_workflow(
                WORKFLOW, arg, id=f"indexes-{collection}", task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
        except WorkflowAlreadyStartedError as exc:
            raise MongoError("ConflictingOperationInProgress",
                             f"another index change of {collection} is running; try again "
                             "when it has finished") from exc
        try:
            result = await asyncio.wait_for(handle.result(), wait_s)
        except TimeoutError as exc:
            raise MongoError(
                "MaxTimeMSExpired",
                f"the index change of {collection} (workflow {handle.id}) did not finish in "
                f"{wait_s:.0f}s and goes on on a worker (is one running?); listIndexes shows "
                "the indexes once it has") from exc
        except WorkflowFailureError as exc:
            root = _root(exc)
            kind = root.type if isinstance(root, ApplicationError) else None
            msg = str(root)
            if kind == "ChunkBusyError":
                raise MongoError(
                    "ConflictingOperationInProgress",
                    f"{collection}: a chunk of this collection is moving; index changes wait "
                    f"until no move of it is live ({msg})") from exc
            if kind == "UnknownCollectionError":
                raise MongoError("NamespaceNotFound", msg) from exc
            raise MongoError("OperationFailed", f"the index change failed: {msg}") from exc
        return [IndexDefinition.model_validate(i) for i in result["indexes"]]
