-- The one CA of the fleet, pinned by the first controller that opened the database: a
-- controller whose data directory holds another CA refuses to start rather than issue
-- certificates nodes of this fleet do not trust (a replaced ca.crt, or a replica of a
-- PostgreSQL fleet given the wrong files). One row.
CREATE TABLE fleet_ca (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint   TEXT NOT NULL,
    cert_pem      TEXT NOT NULL,
    pinned_at_ms  INTEGER NOT NULL
);
