"""The optional C accelerator of the change stream, and the way to do without it.

``shards/postgres/_pgoutput_fast.c`` (built by ``setup.py`` when a compiler is there) drains
the walsender's buffered CopyData frames in one call and decodes the hot ones, document
inserts and updates, into :class:`~shards.postgres.pgoutput.Upsert` records; everything else
goes back to the pure-Python :class:`~shards.postgres.pgoutput.ChunkDecoder`, which stays the
reference (``tests/test_pgoutput_fast.py`` holds the two paths equal).

It calls libpq directly, so it must use the libpq psycopg itself loaded (``psycopg[binary]``
bundles its own under ``psycopg_binary.libs``): :func:`libpq` finds that file among the
process's mappings, checks its version against psycopg's, and hands the functions' addresses
to the module. When anything is missing (no compiled module, an unknown libpq, psycopg's
Python implementation without a loadable library), :func:`accelerator` returns None and the
pure-Python path runs; it says why once, at debug level.

``SHARDSHIFT_PURE_PYTHON=1`` in the environment forces the pure-Python path.
"""

from __future__ import annotations

import ctypes
import logging
import os
from types import ModuleType

from psycopg import pq

log = logging.getLogger(__name__)

PURE_PYTHON_ENV = "SHARDSHIFT_PURE_PYTHON"

_loaded: list[ModuleType | None] = []


def pure_python_forced() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def libpq() -> ctypes.CDLL | None:
    """The libpq psycopg calls (already loaded in this process), or None when unsure."""
    if pq.__impl__ == "python":
        from psycopg.pq import _pq_ctypes  # noqa: PLC0415 - only with psycopg's ctypes impl

        lib: ctypes.CDLL = _pq_ctypes.__dict__["pq"]
        return lib
    with open("/proc/self/maps") as maps:
        fields = (line.split(None, 5) for line in maps)
        paths = {f[5].strip() for f in fields if len(f) == 6}
    found = sorted(p for p in paths if os.path.basename(p).startswith("libpq"))
    if len(found) != 1:
        log.debug("C decoder off: libpq mappings %s (want exactly one)", found)
        return None
    return ctypes.CDLL(found[0])


def libpq_functions(lib: ctypes.CDLL) -> tuple[int, int]:
    """The addresses of ``PQgetCopyData`` and ``PQfreemem`` in ``lib`` (what the C module's
    ``configure`` takes)."""
    getcopy = ctypes.cast(lib.PQgetCopyData, ctypes.c_void_p).value
    freemem = ctypes.cast(lib.PQfreemem, ctypes.c_void_p).value
    return getcopy or 0, freemem or 0


_compiled: list[ModuleType | None] = []


def compiled() -> ModuleType | None:
    """The compiled module for what needs no libpq (the batch's collapse and COPY buffers),
    or None (no compiled module, or ``SHARDSHIFT_PURE_PYTHON`` set: read at every call)."""
    if pure_python_forced():
        return None
    if not _compiled:
        try:
            from shards.postgres import _pgoutput_fast  # type: ignore[attr-defined]  # noqa: PLC0415 - optional, compiled

            _compiled.append(_pgoutput_fast)
        except ImportError as exc:
            log.debug("C accelerator off: %s", exc)
            _compiled.append(None)
    return _compiled[0]


def _load() -> ModuleType | None:
    if pure_python_forced():
        log.debug("C decoder off: %s is set", PURE_PYTHON_ENV)
        return None
    _pgoutput_fast = compiled()
    if _pgoutput_fast is None:
        return None
    try:
        lib = libpq()
        if lib is None:
            return None
        lib.PQlibVersion.restype = ctypes.c_int
        if lib.PQlibVersion() != pq.version():
            log.debug("C decoder off: libpq %s is not psycopg's %s", lib.PQlibVersion(),
                      pq.version())
            return None
        _pgoutput_fast.configure(*libpq_functions(lib))
        _lib.append(lib)
    except Exception as exc:  # noqa: BLE001 - any doubt means the pure-Python path
        log.debug("C decoder off: %s", exc)
        return None
    module: ModuleType = _pgoutput_fast
    return module


_lib: list[ctypes.CDLL] = []


def accelerator() -> ModuleType | None:
    """The configured C module, or None (the pure-Python path). Decided once per process,
    except that ``SHARDSHIFT_PURE_PYTHON`` is read at every call."""
    if pure_python_forced():
        return None
    if not _loaded:
        _loaded.append(_load())
    return _loaded[0]


def conn_address(pgconn: pq.abc.PGconn) -> int:
    """The ``PGconn *`` behind psycopg's connection object (every implementation has it)."""
    address: int = pgconn.pgconn_ptr  # type: ignore[attr-defined]
    return address


def usable_with(pgconn: pq.abc.PGconn) -> bool:
    """The loaded libpq understands this connection (its ``PQsocket`` agrees with psycopg's)."""
    if not _lib:
        return False
    lib = _lib[0]
    lib.PQsocket.restype = ctypes.c_int
    lib.PQsocket.argtypes = [ctypes.c_void_p]
    try:
        return bool(lib.PQsocket(conn_address(pgconn)) == pgconn.socket)
    except Exception as exc:  # noqa: BLE001 - any doubt means the Python path
        log.debug("C decoder off for this connection: %s", exc)
        return False


def path() -> str:
    """``"c"`` or ``"python"``: which decoder a change stream started now would use."""
    return "c" if accelerator() is not None else "python"
