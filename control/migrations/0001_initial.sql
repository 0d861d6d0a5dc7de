-- Siphon controller store, schema 1.
--
-- Valid on SQLite and PostgreSQL alike. (Counters were spelled INTEGER
-- when only SQLite ran this; BIGINT is the same there, and 64-bit on
-- PostgreSQL.)
--
-- Each API object is one JSON document (`doc`, the serde form of the
-- matching type in control/src/model.rs). The columns beside it are the
-- relationships, so the database enforces them: a child cannot outlive or
-- precede its parent.

CREATE TABLE load_balancer (
    id   TEXT PRIMARY KEY,
    doc  TEXT NOT NULL
);

CREATE TABLE listener (
    id               TEXT PRIMARY KEY,
    load_balancer_id TEXT NOT NULL REFERENCES load_balancer (id),
    doc              TEXT NOT NULL
);

CREATE TABLE pool (
    id               TEXT PRIMARY KEY,
    load_balancer_id TEXT NOT NULL REFERENCES load_balancer (id),
    doc              TEXT NOT NULL
);

CREATE TABLE member (
    id      TEXT PRIMARY KEY,
    pool_id TEXT NOT NULL REFERENCES pool (id),
    doc     TEXT NOT NULL
);

CREATE TABLE health_monitor (
    id      TEXT PRIMARY KEY,
    pool_id TEXT NOT NULL UNIQUE REFERENCES pool (id),
    doc     TEXT NOT NULL
);

CREATE TABLE amphora (
    id               TEXT PRIMARY KEY,
    load_balancer_id TEXT REFERENCES load_balancer (id),
    doc              TEXT NOT NULL
);

-- Counters per listener and amphora, accumulated from heartbeats.
CREATE TABLE listener_stats (
    listener_id        TEXT NOT NULL REFERENCES listener (id) ON DELETE CASCADE,
    amphora_id         TEXT NOT NULL,
    bytes_in           BIGINT NOT NULL,
    bytes_out          BIGINT NOT NULL,
    active_connections BIGINT NOT NULL,
    total_connections  BIGINT NOT NULL,
    request_errors     BIGINT NOT NULL,
    PRIMARY KEY (listener_id, amphora_id)
);
