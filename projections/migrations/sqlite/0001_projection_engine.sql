-- Projection engine tables (SQLite). Same semantics as ../postgres/0001_projection_engine.sql.
-- Read-model tables themselves are created by the engine per generation
-- (`<table>__g<N>` + a view `<table>` on the active generation), not here.

-- One row per projection: the checkpoint of the active generation, written in the same
-- transaction as that generation's read-model rows; `revision` changes with every
-- commit by anyone, so a runner notices that another process wrote.
CREATE TABLE projection_state (
    projection         TEXT PRIMARY KEY,
    active_generation  INTEGER NOT NULL,
    position           INTEGER NOT NULL,
    revision           INTEGER NOT NULL,
    status             TEXT NOT NULL,
    stopped_reason     TEXT,
    events_applied     INTEGER NOT NULL,
    checkpoint_recorded_at TEXT,
    rate_events_per_sec REAL NOT NULL,
    updated_at         TEXT NOT NULL,
    shadow_generation  INTEGER,
    shadow_position    INTEGER,
    shadow_started_at  TEXT
);

-- Poison events: a handler error quarantines the event here with its error.
CREATE TABLE projection_dead_letters (
    projection      TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    global_position INTEGER NOT NULL,
    stream_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    error           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    status          TEXT NOT NULL,
    failed_at       TEXT NOT NULL,
    resolved_at     TEXT,
    PRIMARY KEY (projection, event_id)
);

CREATE INDEX projection_dead_letters_open ON projection_dead_letters (status, projection);
