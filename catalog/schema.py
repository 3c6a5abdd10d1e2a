"""The catalog's SQL schema: schema ``catalog`` in database ``shardshift`` of the catalog instance.

Invariants the database itself enforces
---------------------------------------
The store checks every operation in Python first, so a person gets a precise error; the
schema repeats the checks that matter most, so a bug (or a hand-written ``UPDATE``) cannot
commit a broken catalog either:

* **Cover, no gap, no overlap.** A deferred constraint trigger on ``chunks`` re-reads the
  touched collection's ranges at ``COMMIT`` and raises SQLSTATE ``SC001`` unless they tile
  ``[-2^63, 2^63)`` exactly. It fires only when ranges change (insert, delete, update of
  ``lo``/``hi``), not on a placement change, and checks each collection once per
  transaction (a transaction-local setting remembers it), so pre-splitting K chunks costs
  one scan, not K.
* **One active migration per chunk.** A partial unique index on ``migrations`` over
  ``(collection, chunk_id) WHERE outcome IS NULL``.
* **Placement on registered shards**: foreign keys from ``chunks``, ``migrations`` and
  ``leases`` to ``shards``; shards are never deleted (``retired`` instead), so history keeps
  its references.

Representation
--------------
``hi`` is NULL for the top of the khash space (2^63 does not fit a bigint), exactly as the
shards' ``chunk_fence`` stores it, so ``int8range(lo, hi)`` is the chunk's range in SQL too.
Chunk ids come from one sequence: unique per collection (and globally), never reused, so a
fence row left behind by an aborted split can never be mistaken for a later chunk's.
``meta.version`` is the catalog version; every change increments it in the same transaction,
which also serializes all catalog changes into one total order.

Upgrading in place
------------------
The DDL is idempotent and is the upgrade path: ``ensure_schema`` (and ``provision_catalog``)
run it on a live catalog of any earlier schema, under the DDL lock, and it adds what is
missing (``ADD COLUMN IF NOT EXISTS``, ``CREATE INDEX IF NOT EXISTS``, triggers created once)
and records ``meta.schema_version``. Schema 2 (routes at fleet scale): ``chunks.version``, the
catalog version of the change that last wrote the row, stamped by the ``chunks_stamp``
trigger, so "the chunks of C changed since version V" is one index range
(``chunks_by_version``); rows from before the upgrade keep 0, which every router has already
seen. ``collections.layout_version`` is the collection's version: ``bump`` sets it in the
same transaction as every chunk-map change (create, move, split, merge, drop-and-recreate).
"""

from __future__ import annotations

SCHEMA = "catalog"
SCHEMA_VERSION = 2
NOTIFY_CHANNEL = "shardshift_catalog"
LAYOUT_ERRCODE = "SC001"

DDL = r"""
CREATE SCHEMA IF NOT EXISTS catalog;

CREATE TABLE IF NOT EXISTS catalog.meta (
    id              smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version         bigint   NOT NULL,
    schema_version  int      NOT NULL
);
INSERT INTO catalog.meta (id, version, schema_version) VALUES (1, 0, 2)
    ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS catalog.shards (
    shard_id            text PRIMARY KEY,
    address             text NOT NULL,
    engine              text NOT NULL,
    major_version       int  NOT NULL CHECK (major_version > 0),
    state               text NOT NULL CHECK (state IN ('active', 'draining', 'retired')),
    capacity_bytes      bigint CHECK (capacity_bytes >= 0),
    capacity_ops_per_s  double precision CHECK (capacity_ops_per_s >= 0),
    registered_at       timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS catalog.collections (
    name            text PRIMARY KEY,
    shard_key       text NOT NULL,
    indexes         jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now(),
    layout_version  bigint NOT NULL
);

CREATE SEQUENCE IF NOT EXISTS catalog.chunk_ids AS bigint START 1;

CREATE TABLE IF NOT EXISTS catalog.chunks (
    collection  text   NOT NULL REFERENCES catalog.collections (name) ON DELETE CASCADE,
    chunk_id    bigint NOT NULL,
    lo          bigint NOT NULL,
    hi          bigint,             -- NULL: the top of the khash space (2^63)
    shard_id    text   NOT NULL REFERENCES catalog.shards (shard_id),
    token       bigint NOT NULL CHECK (token >= 1),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, chunk_id),
    UNIQUE (collection, lo),
    CHECK (hi IS NULL OR lo < hi)
);
CREATE INDEX IF NOT EXISTS chunks_by_shard ON catalog.chunks (shard_id);

-- Observations, not metadata: written without a version bump (see catalog.models).
CREATE TABLE IF NOT EXISTS catalog.chunk_stats (
    collection  text   NOT NULL,
    chunk_id    bigint NOT NULL,
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    doc_count   bigint NOT NULL CHECK (doc_count >= 0),
    ops_per_s   double precision NOT NULL CHECK (ops_per_s >= 0),
    measured_at timestamptz,        -- NULL: an estimate (carried over by a split or merge)
    PRIMARY KEY (collection, chunk_id),
    FOREIGN KEY (collection, chunk_id) REFERENCES catalog.chunks ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS catalog.migrations (
    migration_id  text PRIMARY KEY,
    kind          text   NOT NULL,
    collection    text   NOT NULL,
    chunk_id      bigint NOT NULL,
    source        text   NOT NULL REFERENCES catalog.shards (shard_id),
    target        text   NOT NULL REFERENCES catalog.shards (shard_id),
    phase         text   NOT NULL,
    outcome       text CHECK (outcome IN ('completed', 'rolled_back', 'aborted', 'failed')),
    token_before  bigint NOT NULL,
    cutover_token bigint,
    cutover_shard text REFERENCES catalog.shards (shard_id),
    pause_ms      double precision,
    detail        text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    committed_at  timestamptz,
    finished_at   timestamptz,
    CHECK (source <> target),
    CHECK ((outcome IS NULL) = (finished_at IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_active_per_chunk
    ON catalog.migrations (collection, chunk_id) WHERE outcome IS NULL;

-- Verification reports (moves' verify phases and `shardshift verify`): observations, written
-- without a version bump. No foreign keys: a report outlives the chunk it describes.
CREATE TABLE IF NOT EXISTS catalog.verifications (
    verification_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind                text   NOT NULL CHECK (kind IN ('move', 'in_flight', 'settled')),
    collection          text   NOT NULL,
    chunk_id            bigint NOT NULL,
    shard_id            text   NOT NULL,
    source              text,
    migration_id        text,
    lsn                 text,
    buckets             int    NOT NULL CHECK (buckets >= 0),
    documents           bigint NOT NULL CHECK (documents >= 0),
    mismatched_buckets  int    NOT NULL CHECK (mismatched_buckets >= 0),
    repaired_ranges     int    NOT NULL CHECK (repaired_ranges >= 0),
    rounds              int    NOT NULL CHECK (rounds >= 0),
    orphans             jsonb  NOT NULL DEFAULT '{}',
    digest              text,
    ok                  boolean NOT NULL,
    detail              text,
    seconds             double precision NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS verifications_by_migration
    ON catalog.verifications (migration_id) WHERE migration_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS verifications_by_chunk
    ON catalog.verifications (collection, chunk_id, created_at DESC);

CREATE TABLE IF NOT EXISTS catalog.leases (
    lease_id      text PRIMARY KEY,   -- "{migration_id}@{shard_id}"
    shard_id      text NOT NULL REFERENCES catalog.shards (shard_id),
    migration_id  text NOT NULL,
    holder        text NOT NULL,
    acquired_at   timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    CHECK (expires_at > acquired_at)
);
CREATE INDEX IF NOT EXISTS leases_by_shard ON catalog.leases (shard_id, expires_at);
CREATE INDEX IF NOT EXISTS leases_by_migration ON catalog.leases (migration_id);

-- Deferred layout check: the touched collection's chunks must tile [-2^63, 2^63) at COMMIT.
CREATE OR REPLACE FUNCTION catalog.check_layout() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    coll   text := CASE WHEN TG_OP = 'DELETE' THEN OLD.collection ELSE NEW.collection END;
    flag   text := 'shardshift_catalog.layout_' || md5(coll);
    expect numeric := -9223372036854775808;
    n      bigint := 0;
    r      record;
BEGIN
    IF coalesce(current_setting(flag, true), '') = 'checked' THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM catalog.collections WHERE name = coll) THEN
        IF EXISTS (SELECT 1 FROM catalog.chunks WHERE collection = coll) THEN
            RAISE EXCEPTION 'collection % has chunks but no collection row', coll
                USING ERRCODE = 'SC001';
        END IF;
        -- Checked once: a dropped collection's N deleted rows must not each probe an index
        -- full of its N dead entries (quadratic: minutes at 100,000 chunks).
        PERFORM set_config(flag, 'checked', true);
        RETURN NULL;
    END IF;
    FOR r IN SELECT lo, hi FROM catalog.chunks WHERE collection = coll ORDER BY lo LOOP
        IF r.lo <> expect THEN
            RAISE EXCEPTION 'collection %: chunk layout has % at khash %', coll,
                CASE WHEN r.lo > expect THEN 'a gap' ELSE 'an overlap' END, expect
                USING ERRCODE = 'SC001';
        END IF;
        expect := coalesce(r.hi::numeric, 9223372036854775808);
        n := n + 1;
    END LOOP;
    IF n = 0 OR expect <> 9223372036854775808 THEN
        RAISE EXCEPTION 'collection %: chunks do not cover the khash space up to 2^63', coll
            USING ERRCODE = 'SC001';
    END IF;
    PERFORM set_config(flag, 'checked', true);
    RETURN NULL;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'chunks_layout'
                   AND tgrelid = 'catalog.chunks'::regclass) THEN
        CREATE CONSTRAINT TRIGGER chunks_layout
            AFTER INSERT OR DELETE OR UPDATE OF lo, hi, collection ON catalog.chunks
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION catalog.check_layout();
    END IF;
END
$do$;

-- Move timelines (catalog/store/samples.py): samples and marks recorded by a move's
-- activities; observations, never a catalog change (no version bump). Gone with the
-- migration record if records are ever purged.
CREATE TABLE IF NOT EXISTS catalog.move_samples (
    migration_id  text NOT NULL REFERENCES catalog.migrations (migration_id) ON DELETE CASCADE,
    kind          text NOT NULL CHECK (kind IN ('copy', 'lag', 'mark')),
    name          text NOT NULL,
    at            timestamptz NOT NULL,
    rows          bigint,
    rate          double precision,
    lag_bytes     bigint,
    lag_s         double precision,
    value         double precision,
    detail        text,
    PRIMARY KEY (migration_id, kind, name, at)
);

-- Bytes per shard of a drain or rebalance, before its first plan and after its last
-- measurement; keyed by workflow id and the first run of its chain (continue-as-new).
CREATE TABLE IF NOT EXISTS catalog.shard_loads (
    operation_id  text NOT NULL,
    first_run_id  text NOT NULL,
    kind          text NOT NULL,
    stage         text NOT NULL CHECK (stage IN ('before', 'after')),
    shard_id      text NOT NULL,  -- a label, not a reference: never blocks removing a shard
    bytes         bigint NOT NULL CHECK (bytes >= 0),
    measured_at   timestamptz NOT NULL,
    PRIMARY KEY (operation_id, first_run_id, stage, shard_id)
);

-- Routed operations per chunk as routers report them (catalog/store/traffic.py): one row per
-- chunk and reporting window, reports of every router summed into it. Observations, never a
-- catalog change. Routers may only add to it, through catalog.report_traffic.
CREATE TABLE IF NOT EXISTS catalog.chunk_traffic (
    collection    text   NOT NULL,
    chunk_id      bigint NOT NULL,
    window_start  timestamptz NOT NULL,
    window_s      int    NOT NULL CHECK (window_s > 0),
    ops           bigint NOT NULL CHECK (ops >= 0),
    PRIMARY KEY (collection, chunk_id, window_start)
);

CREATE OR REPLACE FUNCTION catalog.report_traffic(
    p_collection text, p_chunks bigint[], p_ops bigint[], p_window_s int
) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- A router's report, bounded: it can add counts, nothing else, and not without limit.
    IF p_window_s IS NULL OR p_window_s < 1 OR p_window_s > 3600 THEN
        RAISE EXCEPTION 'window must be 1 to 3600 seconds' USING ERRCODE = '22023';
    END IF;
    IF cardinality(p_chunks) > 100000 OR cardinality(p_chunks) <> cardinality(p_ops) THEN
        RAISE EXCEPTION 'a report holds at most 100000 chunks, one count each'
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO catalog.chunk_traffic AS t (collection, chunk_id, window_start, window_s, ops)
    SELECT p_collection, x.c,
           to_timestamp(floor(extract(epoch FROM clock_timestamp()) / p_window_s) * p_window_s),
           p_window_s, least(x.n, 1000000000)
      FROM unnest(p_chunks, p_ops) AS x(c, n)
      JOIN catalog.chunks ch ON ch.collection = p_collection AND ch.chunk_id = x.c
     WHERE x.n > 0
    ON CONFLICT (collection, chunk_id, window_start)
        DO UPDATE SET ops = least(t.ops + EXCLUDED.ops, 9000000000000000000);
END
$fn$;

-- Schema 2: routers refresh incrementally. A chunk row carries the catalog version of the
-- change that wrote it; the stamp is the version this transaction's bump will commit
-- (a serializable transaction that bumps read meta.version in its snapshot, and fails on a
-- conflict if another change bumped it first). Rows from before the upgrade keep 0.
ALTER TABLE catalog.chunks ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS chunks_by_version ON catalog.chunks (collection, version);

CREATE OR REPLACE FUNCTION catalog.stamp_chunk() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.version := (SELECT version + 1 FROM catalog.meta WHERE id = 1);
    RETURN NEW;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'chunks_stamp'
                   AND tgrelid = 'catalog.chunks'::regclass) THEN
        CREATE TRIGGER chunks_stamp BEFORE INSERT OR UPDATE ON catalog.chunks
            FOR EACH ROW EXECUTE FUNCTION catalog.stamp_chunk();
    END IF;
END
$do$;

-- The active migrations (status, moves, the busy-chunk refusal) without reading the history.
CREATE INDEX IF NOT EXISTS migrations_active ON catalog.migrations (collection, started_at)
    WHERE outcome IS NULL;

UPDATE catalog.meta SET schema_version = 2 WHERE schema_version < 2;

-- The moves a fleet operation planned, per round, in plan order (catalog/store/plans.py): read
-- back in pages so a plan of thousands of moves never passes through the workflow's history.
CREATE TABLE IF NOT EXISTS catalog.fleet_plans (
    plan_id     text NOT NULL,
    round       integer NOT NULL CHECK (round >= 1),
    seq         integer NOT NULL CHECK (seq >= 0),
    collection  text NOT NULL,
    chunk_id    bigint NOT NULL,
    source      text NOT NULL,  -- labels, not references: a plan never blocks removing a shard
    target      text NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (plan_id, round, seq)
);
"""
