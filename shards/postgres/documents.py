"""Fenced single-document operations, each one statement and one round trip.

Every statement computes the fence check as a MATERIALIZED CTE ``f`` and its top-level SELECT
reads ``f``, so the check runs even when no document matches (an operation that finds nothing
on a shard that no longer owns the chunk must fail with a fence error, not answer "not found").
Data-modifying CTEs read ``f`` too, so the fence row is share-locked before the statement's
transaction commits; see ``schema.py`` for why that orders every accepted write before a freeze.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from shards.codec import decode_document, encode_document, encode_value
from shards.errors import (
    FenceRejectedError,
    InvalidDocumentError,
    KeyOutsideChunkError,
    ShardConnectionLostError,
)
from shards.models import FenceRef
from shards.names import check_collection, check_field_path
from shards.postgres.schema import collection_table, field_expr

# The fence check, inline: a plain SQL CASE on the fence row, so the accepted path costs no
# function call; ``fence_reject`` (PL/pgSQL) runs only to raise the error when it fails. It
# must stay VOLATILE so the planner never folds it. Writes read the row through a
# ``FOR SHARE`` sub-select: under READ COMMITTED a row updated meanwhile (a freeze that
# committed while we waited for the lock) is re-read at its newest version, so the CASE
# judges the fence as it is *now*, and the share lock orders this write before any later
# freeze (see schema.py). The lock goes through the view ``chunk_fence_lock``, so a role
# without write access to the fence (the router) can take it (see schema.py).
_FENCE_OK = (
    "CASE WHEN cf.token = %(t)s::bigint AND cf.state = 'active'"
    " AND (%(h)s::bigint IS NULL OR (%(h)s::bigint >= cf.lo"
    " AND (cf.hi IS NULL OR %(h)s::bigint < cf.hi)))"
    " THEN true ELSE shardshift.fence_reject(%(c)s, %(k)s::bigint, %(t)s::bigint, %(h)s::bigint)"
    " END AS ok"
)
_FENCE_W = (
    "SELECT " + _FENCE_OK + " FROM (SELECT 1) AS one LEFT JOIN ("  # noqa: S608 - constants only
    "SELECT token, state, lo, hi FROM shardshift.chunk_fence_lock"
    " WHERE collection = %(c)s AND chunk_id = %(k)s::bigint FOR SHARE) AS cf ON true"
)
_FENCE_R = (
    "SELECT " + _FENCE_OK + " FROM (SELECT 1) AS one LEFT JOIN shardshift.chunk_fence AS cf"  # noqa: S608
    " ON cf.collection = %(c)s AND cf.chunk_id = %(k)s::bigint"
)

PATCH_OPERATORS = {"$set": "set", "$unset": "unset", "$inc": "inc"}
_NUMERIC_KEYS = {"$numberInt", "$numberLong", "$numberDouble", "$numberDecimal"}


def translate_error(exc: psycopg.Error, collection: str, chunk_id: int) -> Exception:
    """Map the fence's SQLSTATEs to typed errors, and a connection that failed under a
    statement to ``ShardConnectionLostError``; anything else passes through.

    The line between "not applied" and "unknown": every routed statement runs alone in
    autocommit, so an ERROR the server reports for it means its transaction rolled back. A
    connection that broke (no server error at all) or a FATAL (the session was terminated)
    may have come after the COMMIT, before its reply: the outcome is unknown.
    """
    state = getattr(exc, "sqlstate", None)
    message = exc.diag.message_primary if exc.diag and exc.diag.message_primary else str(exc)
    if state == "SS001":
        return FenceRejectedError(message, collection=collection, chunk_id=chunk_id)
    if state == "SS002":
        return KeyOutsideChunkError(message)
    if state == "SS003":
        return InvalidDocumentError(message)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        severity = exc.diag.severity_nonlocalized if exc.diag else None
        if severity != "ERROR":
            # The message names no host or port: it may reach an application.
            return ShardConnectionLostError(
                f"{collection}: the shard connection failed during the operation; it may or "
                "may not have been applied"
            )
    return exc


class DocumentStatements:
    """SQL of the document operations of one collection, composed once and reused."""

    def __init__(self, collection: str) -> None:
        self.collection = check_collection(collection)
        t = collection_table(collection)
        w, r = sql.SQL(_FENCE_W), sql.SQL(_FENCE_R)
        insert = sql.SQL(
            "WITH f AS MATERIALIZED ({w}),"
            " ins AS (INSERT INTO {t} (khash, id, doc)"
            "  SELECT %(h)s, %(id)s, %(doc)s::jsonb FROM f ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT (SELECT ok FROM f), (SELECT count(*) FROM ins)"
        ).format(w=w, t=t)
        replace = sql.SQL(
            "WITH f AS MATERIALIZED ({w}),"
            " upd AS (UPDATE {t} d SET doc = %(doc)s::jsonb FROM f"
            "  WHERE d.khash = %(h)s AND d.id = %(id)s RETURNING 1)"
            " SELECT (SELECT ok FROM f), (SELECT count(*) FROM upd)"
        ).format(w=w, t=t)
        patch = sql.SQL(
            "WITH f AS MATERIALIZED ({w}),"
            " upd AS (UPDATE {t} d SET doc = shardshift.apply_patch(d.doc, %(patch)s::jsonb)"
            "  FROM f WHERE d.khash = %(h)s AND d.id = %(id)s RETURNING d.doc::text AS doc)"
            " SELECT (SELECT ok FROM f), (SELECT doc FROM upd)"
        ).format(w=w, t=t)
        delete = sql.SQL(
            "WITH f AS MATERIALIZED ({w}),"
            " del AS (DELETE FROM {t} d USING f WHERE d.khash = %(h)s AND d.id = %(id)s"
            "  RETURNING 1)"
            " SELECT (SELECT ok FROM f), (SELECT count(*) FROM del)"
        ).format(w=w, t=t)
        # A get is one row of two left joins: the fence's CASE and the document (NULL when
        # there is none). About 3 % cheaper on the server than the CTE and sub-select the
        # other statements use (which writes need: the fence row is locked first).
        get = sql.SQL(
            "SELECT " + _FENCE_OK + ", d.doc::text FROM (SELECT 1) AS one"  # noqa: S608
            " LEFT JOIN shardshift.chunk_fence AS cf"
            " ON cf.collection = %(c)s AND cf.chunk_id = %(k)s::bigint"
            " LEFT JOIN {t} AS d ON d.khash = %(h)s AND d.id = %(id)s"
        ).format(t=t)
        get_many = sql.SQL(
            "WITH f AS MATERIALIZED ({r})"
            " SELECT (SELECT ok FROM f),"
            "  array(SELECT doc::text FROM {t} WHERE khash = %(h)s AND id = ANY(%(ids)s::text[])"
            "   ORDER BY id)"
        ).format(r=r, t=t)
        self.get_many = get_many.as_bytes(None)
        self._t = t
        # Rendered once: composing the identifiers into the text on every execute costs more
        # than the rest of the client side of a get. (Names are validated; UTF-8 throughout.)
        self.insert, self.replace, self.patch, self.delete, self.get = (
            q.as_bytes(None) for q in (insert, replace, patch, delete, get)
        )

    def find_key_sql(self, shard_key: str) -> bytes:
        """Find by shard-key value within one chunk (the khash narrows it to one index range)."""
        return sql.SQL(
            "WITH f AS MATERIALIZED ({r})"
            " SELECT (SELECT ok FROM f),"
            "  array(SELECT doc::text FROM {t} WHERE khash = %(h)s AND {sk} = %(v)s::jsonb"
            "   ORDER BY id LIMIT %(n)s)"
        ).format(r=sql.SQL(_FENCE_R), t=self._t,
                 sk=field_expr(check_field_path(shard_key))).as_bytes(None)

    def replace_pinned_sql(self, shard_key: str) -> bytes:
        """Replace the document with this khash and ``_id`` whose shard key is (as stored)
        exactly ``%(v)s``, unless it already equals the new one: (fence ok, documents
        matched, documents written) in one statement. The row is locked (``FOR UPDATE``)
        before it is compared, so a concurrent write is compared at its newest version."""
        return sql.SQL(
            "WITH f AS MATERIALIZED ({w}),"
            " old AS (SELECT d.doc FROM {t} d, f WHERE d.khash = %(h)s AND d.id = %(id)s"
            "  AND {sk} = %(v)s::jsonb FOR UPDATE OF d),"
            " upd AS (UPDATE {t} d SET doc = %(doc)s::jsonb FROM old"
            "  WHERE d.khash = %(h)s AND d.id = %(id)s"
            "  AND old.doc IS DISTINCT FROM %(doc)s::jsonb RETURNING 1)"
            " SELECT (SELECT ok FROM f), (SELECT count(*) FROM old), (SELECT count(*) FROM upd)"
        ).format(w=sql.SQL(_FENCE_W), t=self._t,
                 sk=field_expr(check_field_path(shard_key))).as_bytes(None)

    def find_field_sql(self, path: str) -> bytes:
        """Scatter leg: documents of the given chunks whose field equals a value."""
        return sql.SQL(
            "WITH f AS MATERIALIZED ("
            "  SELECT shardshift.fence_check(%(c)s, u.k, u.t, NULL, false) AS ok"
            "  FROM unnest(%(ks)s::bigint[], %(ts)s::bigint[]) AS u(k, t))"
            " SELECT (SELECT count(*) FROM f),"
            "  array(SELECT d.doc::text FROM {t} d JOIN shardshift.chunk_fence cf"
            "   ON cf.collection = %(c)s AND cf.chunk_id = ANY(%(ks)s::bigint[])"
            "   AND d.khash >= cf.lo AND (cf.hi IS NULL OR d.khash < cf.hi)"
            "   WHERE {e} = %(v)s::jsonb ORDER BY d.khash, d.id LIMIT %(n)s)"
        ).format(t=self._t, e=field_expr(check_field_path(path))).as_bytes(None)


    def scan_sql(self, where: str | None = None, *, by_hash: bool = False) -> bytes:
        """Keyset page of one chunk: its rows after ``(lh, li)`` in (khash, id) order, at most
        ``n`` and, after the first, no more than ``budget`` bytes of stored documents: how many
        rows were read (``n`` or less), then three arrays (khash, id, document text; NULL
        when there is none) of those kept.

        Fenced like ``get``, and the fence row must also have the range the caller read the
        chunk at (``lo``, ``hi``; else a fence rejection), so the page's bounds are plain
        parameters: the planner walks the primary key in order from ``(lh, li)`` and stops
        after ``n`` rows (bounds read from the fence row in the statement made it scan and
        sort the whole rest of the chunk for every page). The caller's position is inside
        the chunk. ``where`` narrows the page: ``"_id"`` (its stored text in ``ids``) or a
        validated field path (its value in ``vs``, as an expression index holds it);
        ``by_hash`` keeps rows whose khash is in ``hs`` (a shard key pinned by ``$in``)."""
        cond: list[sql.Composable] = [
            sql.SQL("(d.khash, d.id) > (%(lh)s::bigint, %(li)s::text)"),
            sql.SQL("d.khash <= %(top)s::bigint"),
        ]
        if by_hash:
            cond.append(sql.SQL("d.khash = ANY(%(hs)s::bigint[])"))
        if where == "_id":
            cond.append(sql.SQL("d.id = ANY(%(ids)s::text[])"))
        elif where is not None:
            cond.append(sql.SQL("{} = ANY(%(vs)s::jsonb[])").format(
                field_expr(check_field_path(where), "doc")))
        return sql.SQL(
            "WITH f AS MATERIALIZED ("
            "  SELECT CASE WHEN cf.token = %(t)s::bigint AND cf.state = 'active'"
            "   AND cf.lo = %(lo)s::bigint AND cf.hi IS NOT DISTINCT FROM %(hi)s::bigint"
            "   THEN true ELSE shardshift.fence_reject(%(c)s, %(k)s::bigint, %(t)s::bigint, NULL)"
            "   END AS ok"
            "  FROM (SELECT 1) AS one LEFT JOIN shardshift.chunk_fence AS cf"
            "  ON cf.collection = %(c)s AND cf.chunk_id = %(k)s::bigint)"
            " SELECT (SELECT ok FROM f), count(*),"
            "  array_agg(p.khash ORDER BY p.khash, p.id) FILTER (WHERE p.keep),"
            "  array_agg(p.id ORDER BY p.khash, p.id) FILTER (WHERE p.keep),"
            "  array_agg(p.doc::text ORDER BY p.khash, p.id) FILTER (WHERE p.keep)"
            " FROM (SELECT q.khash, q.id, q.doc, sum(pg_column_size(q.doc))"
            "   OVER (ORDER BY q.khash, q.id) - pg_column_size(q.doc) < %(budget)s AS keep"
            "  FROM (SELECT d.khash, d.id, d.doc FROM {t} d"
            "   WHERE {cond} ORDER BY d.khash, d.id LIMIT %(n)s) AS q) AS p"
        ).format(t=self._t, cond=sql.SQL(" AND ").join(cond)).as_bytes(None)

    def count_sql(self) -> bytes:
        """Fenced count of the documents of the given chunks (all on this shard)."""
        return sql.SQL(
            "WITH f AS MATERIALIZED ("
            "  SELECT shardshift.fence_check(%(c)s, u.k, u.t, NULL, false) AS ok"
            "  FROM unnest(%(ks)s::bigint[], %(ts)s::bigint[]) AS u(k, t))"
            " SELECT (SELECT count(*) FROM f),"
            "  (SELECT count(*) FROM {t} d JOIN shardshift.chunk_fence cf"
            "   ON cf.collection = %(c)s AND cf.chunk_id = ANY(%(ks)s::bigint[])"
            "   AND d.khash >= cf.lo AND (cf.hi IS NULL OR d.khash < cf.hi))"
        ).format(t=self._t).as_bytes(None)


def validate_patch(update: Mapping[str, Any], protected: Sequence[str]) -> str:
    """A MongoDB-style update (``$set``, ``$unset``, ``$inc``) as the JSON ``apply_patch`` takes.

    ``protected`` field paths (``_id`` and the shard key) cannot be changed, nor any path
    inside or above them.
    """
    if not isinstance(update, Mapping) or not update:
        raise InvalidDocumentError("a patch must be a non-empty mapping of update operators")
    out: dict[str, Any] = {}
    seen: list[tuple[str, ...]] = []
    for op, fields in update.items():
        if op not in PATCH_OPERATORS:
            raise InvalidDocumentError(
                f"unsupported update operator {op!r}; use one of {sorted(PATCH_OPERATORS)}"
            )
        if not isinstance(fields, Mapping) or not fields:
            raise InvalidDocumentError(f"{op} needs a non-empty mapping of field paths")
        for path in fields:
            parts = check_field_path(path)
            for p in protected:
                pp = tuple(p.split("."))
                n = min(len(pp), len(parts))
                if pp[:n] == parts[:n]:
                    raise InvalidDocumentError(f"{op} may not change {p!r} (field {path!r})")
            for other in seen:
                n = min(len(other), len(parts))
                if other[:n] == parts[:n]:
                    raise InvalidDocumentError(f"conflicting update paths at {path!r}")
            seen.append(parts)
        key = PATCH_OPERATORS[op]
        if key == "unset":
            out[key] = list(fields)
        elif key == "inc":
            inc: dict[str, Any] = {}
            for path, value in fields.items():
                if isinstance(value, bool):
                    raise InvalidDocumentError(f"$inc needs a number for {path!r}, not a bool")
                encoded = _loads(encode_value(value))
                if not (isinstance(encoded, dict) and set(encoded) <= _NUMERIC_KEYS):
                    raise InvalidDocumentError(f"$inc needs a number for {path!r}")
                inc[path] = encoded
            out[key] = inc
        else:
            out[key] = {path: _loads(encode_value(value)) for path, value in fields.items()}
    return json.dumps(out, separators=(",", ":"))


def _loads(text: str) -> Any:
    return json.loads(text)


def encode_for_store(doc: Mapping[str, Any]) -> tuple[str, str]:
    """(id text, document text) for a document that must carry an ``_id``."""
    if not isinstance(doc, Mapping):
        raise InvalidDocumentError(f"a document must be a mapping, not {type(doc).__name__}")
    if "_id" not in doc:
        raise InvalidDocumentError("a document needs an _id")
    return encode_value(doc["_id"]), encode_document(doc)


def decode_many(texts: Sequence[str]) -> list[dict[str, Any]]:
    return [decode_document(t) for t in texts]


def fence_params(collection: str, ref: FenceRef, khash: int | None) -> dict[str, Any]:
    return {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash}
