-- The single writer's fast path: a whole group commit as ONE statement, so an append costs
-- one round trip and one (implicit) transaction instead of ten round trips.
--
-- The writer plans the group from what it remembers (head position, stream versions and
-- hashes) and this function proves that memory still holds under the write lock before it
-- inserts anything: the head is unchanged and every stream of the group is at the assumed
-- version and hash (0 / '' for a stream assumed new). Event ids that already exist fail the
-- UNIQUE constraint. Either failure rolls the whole statement back — SQLSTATE CLSTA or
-- unique_violation tell the writer to plan again from state loaded in a transaction (the
-- 0001 path). Positions are assigned under pg_advisory_xact_lock exactly as on that path:
-- the lock is released only after the commit is visible, so positions stay gap-free and in
-- commit order.
CREATE FUNCTION chartline_append_group(
    lock_key          BIGINT,
    expected_head     BIGINT,
    assumed_streams   TEXT[],
    assumed_versions  BIGINT[],
    assumed_hashes    TEXT[],
    e_position        BIGINT[],
    e_event_id        TEXT[],
    e_tenant          TEXT[],
    e_stream          TEXT[],
    e_version         BIGINT[],
    e_type            TEXT[],
    e_schema          INT[],
    e_data            TEXT[],
    e_metadata        TEXT[],
    e_recorded_at     TEXT[],
    e_prev_hash       TEXT[],
    e_hash            TEXT[],
    s_stream          TEXT[],
    s_tenant          TEXT[],
    s_category        TEXT[],
    s_version         BIGINT[],
    s_last_hash       TEXT[]
) RETURNS VOID
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    -- A VOLATILE function takes a new snapshot per statement: this one starts after the
    -- lock was granted and sees every earlier writer's commit.
    SELECT COALESCE(MAX(global_position), 0) INTO head FROM events;
    IF head <> expected_head THEN
        RAISE EXCEPTION 'event store head is %, the writer assumed %', head, expected_head
            USING ERRCODE = 'CLSTA';
    END IF;
    IF EXISTS (
        SELECT 1
        FROM unnest(assumed_streams, assumed_versions, assumed_hashes)
            AS assumed (stream_id, version, last_hash)
        LEFT JOIN streams ON streams.stream_id = assumed.stream_id
        WHERE COALESCE(streams.version, 0) <> assumed.version
           OR COALESCE(streams.last_hash, '') <> assumed.last_hash
    ) THEN
        RAISE EXCEPTION 'a stream moved since the writer last saw it' USING ERRCODE = 'CLSTA';
    END IF;
    INSERT INTO events (global_position, event_id, tenant_id, stream_id, stream_version, event_type,
                        schema_version, data, metadata, recorded_at, prev_hash, hash)
    SELECT * FROM unnest(e_position, e_event_id, e_tenant, e_stream, e_version, e_type,
                         e_schema, e_data, e_metadata, e_recorded_at, e_prev_hash, e_hash);
    INSERT INTO streams (stream_id, tenant_id, category, version, last_hash)
    SELECT * FROM unnest(s_stream, s_tenant, s_category, s_version, s_last_hash)
    ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, last_hash = excluded.last_hash;
    IF cardinality(e_position) > 0 THEN
        -- Wakes live subscribers in other processes (LISTEN chartline_events).
        PERFORM pg_notify('chartline_events', e_position[cardinality(e_position)]::text);
    END IF;
END
$$;
