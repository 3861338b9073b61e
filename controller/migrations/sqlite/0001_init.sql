-- powernode-controller schema, version 1. Timestamps are milliseconds since the Unix epoch.

CREATE TABLE nodes (
    id             TEXT PRIMARY KEY,
    uuid           TEXT NOT NULL UNIQUE,
    hostname       TEXT NOT NULL,
    arch           TEXT NOT NULL,
    enrolled_at_ms INTEGER NOT NULL,
    -- NULL while the node is allowed in; set once by revocation.
    revoked_at_ms  INTEGER
);

-- Bootstrap tokens are stored as SHA-256 hex, never in clear.
CREATE TABLE bootstrap_tokens (
    token_hash    TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms    INTEGER,
    used_by_node  TEXT REFERENCES nodes(id),
    -- When set, only the node with this identity uuid may use the token.
    node_uuid     TEXT
);

CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    node_id       TEXT NOT NULL REFERENCES nodes(id),
    fingerprint   TEXT NOT NULL UNIQUE,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    issued_at_ms  INTEGER NOT NULL
);
CREATE INDEX certificates_by_node ON certificates(node_id, not_after_ms);

-- The newest row of a node is its latest heartbeat; older rows are trimmed to a bounded history.
CREATE TABLE heartbeats (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id            TEXT NOT NULL REFERENCES nodes(id),
    received_at_ms     INTEGER NOT NULL,
    boot_id            TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    applied_generation INTEGER,
    body               TEXT NOT NULL
);
CREATE INDEX heartbeats_by_node ON heartbeats(node_id, id);

CREATE TABLE desired_state (
    node_id       TEXT PRIMARY KEY REFERENCES nodes(id),
    generation    INTEGER NOT NULL,
    modules       TEXT NOT NULL,
    network       TEXT,
    updated_at_ms INTEGER NOT NULL
);
