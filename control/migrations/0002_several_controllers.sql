-- Schema 2: several controllers sharing one store: the change log and claims.
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
