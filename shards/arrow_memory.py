"""The allocator behind the Arrow buffers of a copy: jemalloc, chosen once per process.

A chunk's copy allocates and frees Arrow buffers at a high rate on several threads at once
(the export decodes COPY blocks and writes Parquet on one, the import's feed reads and
encodes on another, the importer's thread frees what was sent). pyarrow's default pool on
Linux wheels is mimalloc, which kept what those threads freed: a 1M-document copy
(``bench.bulk_copy``) peaked at 356 MB with at most 55 MB of Arrow buffers live, and the
process stayed near 280 MB after the move. The system allocator peaked at 318 MB. jemalloc,
as pyarrow configures it (freed pages returned after about a second), peaked at 251 MB and
fell back to about 150 MB between moves, at the same speed (see docs/architecture.md,
"Performance: bulk copy").

An operator's ``ARROW_DEFAULT_MEMORY_POOL`` (``jemalloc``, ``mimalloc`` or ``system``) is
left as it is; a pyarrow built without jemalloc keeps its default.
"""

from __future__ import annotations

import os
import threading

import pyarrow as pa

ENV = "ARROW_DEFAULT_MEMORY_POOL"

_lock = threading.Lock()
_backend: str | None = None


def use_copy_pool() -> str:
    """Make jemalloc this process's default Arrow pool (once; later calls are free) unless
    ``ARROW_DEFAULT_MEMORY_POOL`` chose one; returns the backend in use.

    Called by the export and the import before they allocate, and by the worker at start.
    Buffers allocated before the switch stay with the pool that made them.
    """
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            if not os.environ.get(ENV):
                try:
                    pa.set_memory_pool(pa.jemalloc_memory_pool())
                except NotImplementedError:  # this pyarrow was built without jemalloc
                    pass
            _backend = pa.default_memory_pool().backend_name
    return _backend


__all__ = ["ENV", "use_copy_pool"]
