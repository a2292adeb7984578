-- Streams become a registry of which tenant owns which stream: a row is written once,
-- when the stream's first event is, and never updated. A stream's version and last hash
-- are its newest event's (the UNIQUE (stream_id, stream_version) index finds it), so an
-- append to an existing stream writes its events and nothing else. Same change as
-- migrations/postgres/0003_stream_registry.sql.
ALTER TABLE streams DROP COLUMN version;
ALTER TABLE streams DROP COLUMN last_hash;
