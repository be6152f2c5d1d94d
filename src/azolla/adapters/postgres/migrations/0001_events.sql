-- 0001: the event log.
--
-- One row per event. `position` is the global order (commit order: the store's single writer
-- takes a transaction-scoped advisory lock before positions are drawn, and releases it only after
-- its commit is visible, so a reader that tails by position never skips a row that commits late).
--
-- Why PARTITION BY RANGE (partition_day):
--   * every event of a stream carries its stream's creation day (`partition_day`), so all rows of
--     one stream live in one partition. A unique index that includes the partition key is then a
--     true per-stream uniqueness: (stream_id, version, partition_day) unique == (stream_id,
--     version) unique, which is the optimistic-concurrency key;
--   * likewise the unique partial index on (stream_id, partition_day) WHERE terminal makes a
--     second terminal event for one stream impossible in the database, whatever the Python does;
--   * finished history is removed by DETACH + DROP (or archive) of whole old partitions, never by
--     DELETE, so the table stays append-only: no UPDATE, no DELETE, no bloat, no vacuum debt on
--     the hot path.
-- (PostgreSQL requires every unique index of a partitioned table to contain the partition key;
-- the column order puts stream_id first so that read_stream, which only knows the stream id, is
-- one index descent per partition.)
--
-- Partitions are one week wide, Monday to Sunday (day numbers since 1970-01-01 UTC; day 4 was a
-- Monday), named azolla_events_YYYYMMDD after their first day, and created ahead of time and on
-- demand by azolla_ensure_event_partition(). The DEFAULT partition is only a safety net for a
-- row whose week has no partition yet; azolla_ensure_event_partition() moves such rows into the
-- new partition before attaching it (attaching a range that overlaps rows of the DEFAULT
-- partition would otherwise fail).
--
-- payload is `json`, not `jsonb`: json keeps the exact text (key order, duplicate keys, \u0000
-- escapes, number spelling), which jsonb would rewrite or reject.

CREATE TABLE azolla_events (
    position      bigint      GENERATED ALWAYS AS IDENTITY,
    domain        text        NOT NULL,
    stream_id     uuid        NOT NULL,
    version       integer     NOT NULL CHECK (version >= 1),
    type          text        NOT NULL,
    payload       json        NOT NULL,
    partition_day integer     NOT NULL,
    terminal      boolean     NOT NULL DEFAULT false,
    recorded_at   timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (partition_day);

COMMENT ON TABLE azolla_events IS
    'Azolla append-only event log; partitioned by week of the stream''s creation day.';

-- Optimistic concurrency: (stream_id, version) is unique (partition_day is constant per stream).
CREATE UNIQUE INDEX azolla_events_stream_version_key
    ON azolla_events (stream_id, version, partition_day);

-- At most one terminal event per stream.
CREATE UNIQUE INDEX azolla_events_one_terminal_key
    ON azolla_events (stream_id, partition_day) WHERE terminal;

-- Tailing readers: read_all(after_position) and max(position).
CREATE INDEX azolla_events_position_idx ON azolla_events (position);

CREATE TABLE azolla_events_default PARTITION OF azolla_events DEFAULT;

-- First day (Monday) of the weekly partition that holds `p_day`.
CREATE FUNCTION azolla_event_partition_start(p_day integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT p_day - (((p_day - 4) % 7) + 7) % 7 $$;

-- Create the weekly partition holding `p_day` unless it exists; return its name.
--
-- Locks are taken in the order every reader and writer takes them -- the parent table first, then
-- its partitions -- so creation cannot deadlock with concurrent reads or appends:
--   1. SHARE UPDATE EXCLUSIVE on azolla_events: serialises creators; readers and writers go on;
--   2. ACCESS EXCLUSIVE on the DEFAULT partition (ATTACH needs it anyway): no row for this week
--      can slip into it between the check below and the attach;
--   3. the partition is created as a plain table and ATTACHed (CREATE TABLE ... PARTITION OF
--      would take ACCESS EXCLUSIVE on the parent and stall every reader and writer).
-- Rows that landed in the DEFAULT partition for that week are moved into the new partition in the
-- same transaction (the only DELETE this schema ever runs, and only on the safety net).
CREATE FUNCTION azolla_ensure_event_partition(p_day integer) RETURNS text
    LANGUAGE plpgsql AS $$
DECLARE
    v_lo     integer := azolla_event_partition_start(p_day);
    v_hi     integer := azolla_event_partition_start(p_day) + 7;
    v_name   text := 'azolla_events_' || to_char(date '1970-01-01' + v_lo, 'YYYYMMDD');
    v_schema text := (SELECT n.nspname FROM pg_class c
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = 'azolla_events'::regclass);
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
               WHERE i.inhparent = 'azolla_events'::regclass AND c.relname = v_name) THEN
        RETURN v_name;
    END IF;
    PERFORM set_config('lock_timeout', '10s', true);
    LOCK TABLE azolla_events IN SHARE UPDATE EXCLUSIVE MODE;
    LOCK TABLE azolla_events_default IN ACCESS EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
               WHERE i.inhparent = 'azolla_events'::regclass AND c.relname = v_name) THEN
        RETURN v_name;
    END IF;
    EXECUTE format('CREATE TABLE %I.%I'
                   ' (LIKE azolla_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   v_schema, v_name);
    EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I'
                   ' CHECK (partition_day >= %s AND partition_day < %s)',
                   v_schema, v_name, v_name || '_bound', v_lo, v_hi);
    EXECUTE format('WITH moved AS (DELETE FROM azolla_events_default'
                   ' WHERE partition_day >= %s AND partition_day < %s RETURNING *)'
                   ' INSERT INTO %I.%I SELECT * FROM moved', v_lo, v_hi, v_schema, v_name);
    EXECUTE format('ALTER TABLE azolla_events ATTACH PARTITION %I.%I'
                   ' FOR VALUES FROM (%s) TO (%s)', v_schema, v_name, v_lo, v_hi);
    -- The bound is now the partition constraint; the CHECK only spared ATTACH a scan.
    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT %I', v_schema, v_name, v_name || '_bound');
    RETURN v_name;
END
$$;
