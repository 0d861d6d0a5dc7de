-- Schema 2: several controllers sharing one store: the change log, claims,
-- heartbeats heard by each, and counters any of them can store.
--
-- Every write transaction appends one row per object it changed, all under
-- the transaction's number (`seq`, one more than the latest). A controller
-- keeps the last number its cache holds and catches up by reading the
-- rows changed since (kind: the object's table, or `listener_stats` with
-- the listener's id). Old numbers are pruned; a controller that fell
-- further behind reloads everything.

CREATE TABLE change_log (
    seq  BIGINT NOT NULL,
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    PRIMARY KEY (seq, kind, id)
);

-- Claims on jobs (a load balancer's push, an amphora's wipe or key): of
-- several controllers, the holder alone works on the job until
-- `expires_at` (milliseconds since the epoch on the database's clock),
-- which it renews while it works. Each taking bumps `fence`; writes made
-- under a claim commit only while holder and fence still match.
CREATE TABLE claim (
    job        TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    fence      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- When each controller last heard each amphora (`heard_at`, milliseconds
-- since the epoch on the database's clock) and the newest heartbeat
-- sequence number it took: silence counts a heartbeat heard by any
-- controller, and a restarted controller takes no beat older than one
-- already taken. Not in the change log: read when needed, not cached.
CREATE TABLE heard (
    amphora_id TEXT NOT NULL,
    controller TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    heard_at   BIGINT NOT NULL,
    PRIMARY KEY (amphora_id, controller)
);

-- Counters as the dataplane last reported them, and the heartbeat they
-- came in: totals move by the difference (all of it after a dataplane
-- restart), only for a newer heartbeat, so any number of controllers
-- storing the same heartbeat count it once.
ALTER TABLE listener_stats ADD COLUMN raw_bytes_in BIGINT NOT NULL DEFAULT 0;
ALTER TABLE listener_stats ADD COLUMN raw_bytes_out BIGINT NOT NULL DEFAULT 0;
ALTER TABLE listener_stats ADD COLUMN raw_total_connections BIGINT NOT NULL DEFAULT 0;
ALTER TABLE listener_stats ADD COLUMN raw_request_errors BIGINT NOT NULL DEFAULT 0;
ALTER TABLE listener_stats ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
