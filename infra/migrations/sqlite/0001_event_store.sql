-- Event store schema (SQLite). Same semantics as migrations/postgres/0001_event_store.sql.
-- Identifiers, JSON and times are TEXT so both backends hash the exact bytes they stored.

CREATE TABLE tenants (
    tenant_id  TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);

INSERT INTO tenants (tenant_id, created_at) VALUES ('default', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));

CREATE TABLE streams (
    stream_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (tenant_id),
    category  TEXT NOT NULL,
    version   INTEGER NOT NULL CHECK (version >= 1),
    last_hash TEXT NOT NULL
);

CREATE INDEX streams_by_tenant ON streams (tenant_id, stream_id);

-- global_position is assigned by the single writer as max + 1 inside BEGIN IMMEDIATE,
-- so positions are gap-free and in commit order.
CREATE TABLE events (
    global_position INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    tenant_id       TEXT NOT NULL,
    stream_id       TEXT NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version >= 1),
    event_type      TEXT NOT NULL,
    schema_version  INTEGER NOT NULL CHECK (schema_version >= 1),
    data            TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    recorded_at     TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    hash            TEXT NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_by_tenant ON events (tenant_id, global_position);
