-- Schema 3: what was deleted, for front ends that follow the changes
-- (`GET /v2/siphon/changes`, the Octavia provider's agent): an object
-- gone from its table is reported `DELETED` from here. Kept for a week
-- (`deleted_at`, milliseconds since the epoch), however many changes
-- came since, where `change_log` keeps a number of changes: a follower
-- away longer than the change log reaches still learns of every delete.
-- Load balancers, listeners, pools, members and health monitors only.

CREATE TABLE tombstone (
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    deleted_at BIGINT NOT NULL,
    PRIMARY KEY (seq, kind, id)
);
CREATE INDEX tombstone_deleted_at ON tombstone (deleted_at);
