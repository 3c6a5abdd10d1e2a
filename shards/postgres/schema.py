"""The shard's SQL schema: metadata in ``shardshift``, one table per collection in ``docs``.

The fence
---------
``shardshift.chunk_fence`` has one row per chunk this shard holds or receives. Every routed
operation calls ``shardshift.fence_write`` / ``fence_read`` inside its own statement, so the
check costs no extra round trip. ``fence_write`` takes the fence row ``FOR SHARE``: a freeze is
an ``UPDATE`` of that row, so it waits for every write in flight to commit, and every write
that starts later re-reads the row (READ COMMITTED re-checks the updated version), sees the new
token and state, and fails with SQLSTATE ``SS001``. Hence every write the source accepted
commits before the freeze, and the freeze's commit LSN ends the chunk's history on the source.

Errors
------
``SS001`` fence rejected (stale token, chunk not active or not on this shard), ``SS002`` the
document's khash is outside the addressed chunk, ``SS003`` invalid patch. Messages are written
for people; the engine maps the codes to typed exceptions.
"""

from __future__ import annotations

import hashlib

from psycopg import sql

from shards.models import KeyRange

DOCS = "docs"

SCHEMA_VERSION = 1

DDL = r"""
CREATE SCHEMA IF NOT EXISTS shardshift;
CREATE SCHEMA IF NOT EXISTS docs;

CREATE TABLE IF NOT EXISTS shardshift.chunk_fence (
    collection  text    NOT NULL,
    chunk_id    bigint  NOT NULL,
    lo          bigint  NOT NULL,
    hi          bigint,             -- NULL: the top of the khash space (2^63)
    token       bigint  NOT NULL,
    state       text    NOT NULL CHECK (state IN ('receiving', 'active', 'frozen', 'retired')),
    migration_id text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, chunk_id)
);

-- The row lock a routed write takes on its fence row (``FOR SHARE``). PostgreSQL asks UPDATE
-- privilege for a row lock, and the router must not be able to write the fence, so the router
-- locks through this view: it may UPDATE only ``lock_only``, which is not a column of the
-- table and cannot be updated, while the lock reaches the fence row with the privileges of
-- the view's owner. The planner reads it exactly like the table (same index, same lock).
CREATE OR REPLACE VIEW shardshift.chunk_fence_lock AS
    SELECT collection, chunk_id, lo, hi, token, state, NULL::boolean AS lock_only
      FROM shardshift.chunk_fence;

-- Bulk-import progress: one row per staged part, committed with the part's rows.
CREATE TABLE IF NOT EXISTS shardshift.import_parts (
    migration_id text   NOT NULL,
    part         int    NOT NULL,
    rows         bigint NOT NULL,
    done_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration_id, part)
);

CREATE OR REPLACE FUNCTION shardshift.fence_check(
    p_collection text, p_chunk bigint, p_token bigint, p_khash bigint, p_lock boolean
) RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    f record;
BEGIN
    IF p_lock THEN
        SELECT token, state, lo, hi INTO f FROM shardshift.chunk_fence
         WHERE collection = p_collection AND chunk_id = p_chunk FOR SHARE;
    ELSE
        SELECT token, state, lo, hi INTO f FROM shardshift.chunk_fence
         WHERE collection = p_collection AND chunk_id = p_chunk;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk %/% is not on this shard', p_collection, p_chunk
            USING ERRCODE = 'SS001';
    END IF;
    IF f.token <> p_token OR f.state <> 'active' THEN
        RAISE EXCEPTION 'chunk %/% is at token % (%), the request carried token %',
            p_collection, p_chunk, f.token, f.state, p_token
            USING ERRCODE = 'SS001';
    END IF;
    IF p_khash IS NOT NULL AND (p_khash < f.lo OR (f.hi IS NOT NULL AND p_khash >= f.hi)) THEN
        RAISE EXCEPTION 'khash % is outside chunk %/% [%, %)',
            p_khash, p_collection, p_chunk, f.lo, coalesce(f.hi::text, '2^63')
            USING ERRCODE = 'SS002';
    END IF;
    RETURN true;
END
$fn$;

-- Called only when the inline fence check of a routed statement fails: says why, as an error.
CREATE OR REPLACE FUNCTION shardshift.fence_reject(
    p_collection text, p_chunk bigint, p_token bigint, p_khash bigint
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    PERFORM shardshift.fence_check(p_collection, p_chunk, p_token, p_khash, false);
    -- The fence changed back between the check and now: still a rejection (retry).
    RAISE EXCEPTION 'chunk %/% changed during the request', p_collection, p_chunk
        USING ERRCODE = 'SS001';
END
$fn$;

-- Set a value at a path, creating intermediate objects (MongoDB $set semantics).
CREATE OR REPLACE FUNCTION shardshift.jsonb_set_path(doc jsonb, path text[], value jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    head text := path[1];
    inner_doc jsonb;
BEGIN
    IF doc IS NULL OR jsonb_typeof(doc) <> 'object' THEN
        RAISE EXCEPTION 'cannot set field % inside a non-document value', head
            USING ERRCODE = 'SS003';
    END IF;
    IF array_length(path, 1) = 1 THEN
        RETURN doc || jsonb_build_object(head, value);
    END IF;
    inner_doc := coalesce(doc -> head, '{}'::jsonb);
    IF jsonb_typeof(inner_doc) = 'object' AND (inner_doc ? '$numberInt' OR inner_doc ? '$numberLong'
            OR inner_doc ? '$numberDouble' OR inner_doc ? '$numberDecimal' OR inner_doc ? '$oid'
            OR inner_doc ? '$date' OR inner_doc ? '$binary') THEN
        RAISE EXCEPTION 'cannot set field % inside the scalar field %', path[2], head
            USING ERRCODE = 'SS003';
    END IF;
    RETURN doc || jsonb_build_object(head, shardshift.jsonb_set_path(inner_doc, path[2:], value));
END
$fn$;

-- Add two canonical Extended JSON numbers with MongoDB's type promotion:
-- decimal > double > int64 > int32; int32 overflow widens to int64; int64 overflow fails.
CREATE OR REPLACE FUNCTION shardshift.ejson_add(a jsonb, b jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    ka text; kb text; r numeric;
BEGIN
    IF a IS NULL THEN RETURN b; END IF;
    SELECT k INTO ka FROM jsonb_object_keys(CASE WHEN jsonb_typeof(a) = 'object' THEN a ELSE '{}' END) k
     WHERE k IN ('$numberInt', '$numberLong', '$numberDouble', '$numberDecimal');
    SELECT k INTO kb FROM jsonb_object_keys(CASE WHEN jsonb_typeof(b) = 'object' THEN b ELSE '{}' END) k
     WHERE k IN ('$numberInt', '$numberLong', '$numberDouble', '$numberDecimal');
    IF ka IS NULL OR kb IS NULL THEN
        RAISE EXCEPTION 'cannot apply $inc to a non-numeric value' USING ERRCODE = 'SS003';
    END IF;
    IF ka = '$numberDecimal' OR kb = '$numberDecimal' THEN
        RETURN jsonb_build_object('$numberDecimal',
            ((a ->> ka)::numeric + (b ->> kb)::numeric)::text);
    END IF;
    IF ka = '$numberDouble' OR kb = '$numberDouble' THEN
        RETURN jsonb_build_object('$numberDouble',
            ((a ->> ka)::float8 + (b ->> kb)::float8)::text);
    END IF;
    r := (a ->> ka)::numeric + (b ->> kb)::numeric;
    IF ka = '$numberInt' AND kb = '$numberInt' AND r BETWEEN -2147483648 AND 2147483647 THEN
        RETURN jsonb_build_object('$numberInt', r::text);
    END IF;
    IF r NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
        RAISE EXCEPTION '$inc overflows a 64-bit integer' USING ERRCODE = 'SS003';
    END IF;
    RETURN jsonb_build_object('$numberLong', r::text);
END
$fn$;

-- Apply a validated patch {"set": {path: value}, "unset": [path], "inc": {path: number}}.
CREATE OR REPLACE FUNCTION shardshift.apply_patch(doc jsonb, patch jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    k text; v jsonb; p text[];
BEGIN
    FOR k, v IN SELECT * FROM jsonb_each(coalesce(patch -> 'set', '{}')) LOOP
        doc := shardshift.jsonb_set_path(doc, string_to_array(k, '.'), v);
    END LOOP;
    FOR k IN SELECT * FROM jsonb_array_elements_text(coalesce(patch -> 'unset', '[]')) LOOP
        doc := doc #- string_to_array(k, '.');
    END LOOP;
    FOR k, v IN SELECT * FROM jsonb_each(coalesce(patch -> 'inc', '{}')) LOOP
        p := string_to_array(k, '.');
        doc := shardshift.jsonb_set_path(doc, p, shardshift.ejson_add(doc #> p, v));
    END LOOP;
    RETURN doc;
END
$fn$;
"""


def collection_table(collection: str) -> sql.Composed:
    """The table of a collection (``docs."<collection>"``); the name must be validated."""
    return sql.SQL("{}.{}").format(sql.Identifier(DOCS), sql.Identifier(collection))


def collection_ddl(collection: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        " khash bigint NOT NULL,"
        " id text NOT NULL,"
        " doc jsonb NOT NULL,"
        " PRIMARY KEY (khash, id))"
    ).format(collection_table(collection))


KHASH_SQL_MAX = 2**63 - 1
"""The largest bigint: the inclusive top of an unbounded range's predicate."""


def range_predicate(key_range: KeyRange) -> sql.Composed:
    """``khash >= lo AND khash < hi`` as literals (COPY takes no parameters): the export, the
    import, verify, cleanup and the applier's delete of a truncated chunk all use it.

    An unbounded top (``hi`` is the end of the khash space, which no bigint reaches) is
    ``khash <= 9223372036854775807``, not left out: the same rows, but a pair of bounds,
    which the planner prices as a narrow range (half a percent of the table) when it has no
    statistics for the column, where a lone ``khash >= lo`` is priced at a third of the
    table and read with a sequential scan of every row once the table is large (a new
    collection on a target, before autovacuum analyzes it; see
    ``test_a_range_is_read_through_the_index_even_without_statistics``)."""
    lo = sql.SQL("khash >= {}").format(sql.Literal(key_range.lo))
    if key_range.sql_hi is None:
        return sql.SQL("{} AND khash <= {}").format(lo, sql.Literal(KHASH_SQL_MAX))
    return sql.SQL("{} AND khash < {}").format(lo, sql.Literal(key_range.sql_hi))


def field_expr(path: tuple[str, ...], column: str = "doc") -> sql.Composed:
    """``doc -> 'a' -> 'b'``: the jsonb expression for a validated field path. Index and query
    build it the same way, so the planner matches them."""
    parts: list[sql.Composable] = [sql.Identifier(column)]
    for segment in path:
        parts.append(sql.SQL(" -> "))
        parts.append(sql.Literal(segment))
    return sql.Composed(parts)


def index_table_name(collection: str, index: str) -> str:
    """The PostgreSQL name of a collection's index: ``ix_<collection>__<index>``, or, when that
    is longer than an identifier may be (63 bytes), its first 46 characters and a hash of the
    whole, so two indexes whose names share a long prefix never get the same name (the second
    ``CREATE INDEX IF NOT EXISTS`` would silently create nothing)."""
    name = f"ix_{collection}__{index}"
    if len(name) <= 63:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return f"{name[:46]}_{digest}"
