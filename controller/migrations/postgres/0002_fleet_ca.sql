-- The one CA of the fleet, as migrations/sqlite/0008_fleet_ca.sql explains: every replica
-- holds a copy of it in its data directory; the first one pins it here, and a replica with
-- another CA refuses to start.
CREATE TABLE fleet_ca (
    id            BIGINT PRIMARY KEY CHECK (id = 1),
    fingerprint   TEXT NOT NULL,
    cert_pem      TEXT NOT NULL,
    pinned_at_ms  BIGINT NOT NULL
);
