-- WireGuard overlay networks (docs/network.md, "The controller's part"). Plain SQL: no
-- SQLite-only types or functions, so the same tables serve a later PostgreSQL store.
--
-- A network: its name (a short slug), its IPv4 CIDR and the UDP port every member listens on.
-- `updated_at_ms` moves with every membership or forward change of the network; writing it
-- first is what serialises two changes of one network (the write lock in SQLite, a row lock
-- elsewhere), so two joins never pick the same address.
CREATE TABLE networks (
    name          TEXT PRIMARY KEY,
    cidr          TEXT NOT NULL,
    listen_port   INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

-- A node is a member of at most one network (the primary key). `address` is its overlay
-- address (a.b.c.d, unique within the network, never the network or broadcast address);
-- `announce` the routes it announces (a JSON array of CIDRs); `endpoint` the operator's
-- HOST:PORT for it, when the operator knows better than the node's reports.
CREATE TABLE network_members (
    node_id      TEXT PRIMARY KEY REFERENCES nodes(id),
    network      TEXT NOT NULL REFERENCES networks(name),
    address      TEXT NOT NULL,
    announce     TEXT NOT NULL,
    endpoint     TEXT,
    joined_at_ms INTEGER NOT NULL,
    UNIQUE (network, address)
);

-- Ports of a member forwarded elsewhere (`target`: a.b.c.d:port). Only members have forwards;
-- leaving a network removes them.
CREATE TABLE port_forwards (
    node_id       TEXT NOT NULL REFERENCES network_members(node_id),
    proto         TEXT NOT NULL,
    port          INTEGER NOT NULL,
    target        TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, proto, port)
);

-- What a node's heartbeats said that its peers are derived from: its WireGuard public key,
-- the endpoints it reported (a JSON array of address:port) and the address its last heartbeat
-- came from. Kept per node, member or not, so a node that joins is a peer at once; written
-- only when it changes.
CREATE TABLE node_network_reports (
    node_id       TEXT PRIMARY KEY REFERENCES nodes(id),
    public_key    TEXT,
    endpoints     TEXT NOT NULL,
    seen_ip       TEXT,
    changed_at_ms INTEGER NOT NULL
);
