-- Streams become a registry of which tenant owns which stream: a row is written once,
-- when the stream's first event is, and never updated. A stream's version and last hash
-- are its newest event's (events UNIQUE (stream_id, stream_version) finds it in one index
-- probe), so an append to an existing stream writes its events and nothing else.
--
-- The single writer's fast path becomes one plain statement (see infra/src/store/
-- postgres.rs, APPEND_SPECULATED): the lock, the events insert, the new streams' registry
-- rows and the notification. What the writer remembers is proved by the unique
-- constraints alone, as on SQLite: the writer's memory never runs ahead of the database,
-- so if anyone else wrote, the first position, stream version, new stream or event id it
-- assumed free already exists and the statement fails as a whole. The head and stream
-- checks of chartline_append_group were a second proof of the same thing, and cost a
-- quarter of every commit.
DROP FUNCTION chartline_append_group(
    BIGINT, BIGINT, TEXT[], BIGINT[], TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[],
    INT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[]
);

ALTER TABLE streams DROP COLUMN version, DROP COLUMN last_hash;
