-- Fleet events sent by nodes (POST /node_api/v1/events). `cursor` orders rows by arrival and
-- is what the operator API pages by; AUTOINCREMENT keeps it from ever being handed out again,
-- even after retention deleted the newest rows, so a follower's cursor never skips new events.
-- An event id is unique per node: a node cannot make another node's events look like
-- duplicates. Severity is stored as its rank (0 Info, 1 Warning, 2 Error, 3 Critical) so that
-- "at least this severe" is a comparison.
CREATE TABLE events (
    cursor         INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id        TEXT NOT NULL REFERENCES nodes(id),
    id             TEXT NOT NULL,
    agent          TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    severity       INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    message        TEXT NOT NULL,
    at_ms          INTEGER NOT NULL,
    received_ms    INTEGER NOT NULL,
    fields         TEXT NOT NULL,
    dropped_before INTEGER NOT NULL,
    UNIQUE (node_id, id)
);
CREATE INDEX events_by_node ON events(node_id, cursor);
CREATE INDEX events_by_received ON events(received_ms);
