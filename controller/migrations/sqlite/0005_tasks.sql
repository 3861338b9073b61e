-- Tasks the operator gives a node (POST /api/v1/tasks), leased by the node
-- (POST /node_api/v1/tasks/lease) and completed by it. `state` is one of queued, leased,
-- succeeded, failed, interrupted, cancelled; the last four are final. A lease lasts
-- `timeout_s` from the lease or the latest renew (`lease_expires_ms`); a lease that runs out
-- returns the task to the queue while `attempts` < `max_attempts`, and fails it after that.
-- `reason` is the controller's word on a final state it set (expiry, cancel); `outcome`,
-- `output` are the node's; `late` marks a completion that came after the lease had run out.
CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    node_id          TEXT NOT NULL REFERENCES nodes(id),
    kind             TEXT NOT NULL,
    args             TEXT NOT NULL,
    timeout_s        INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_expires_ms INTEGER,
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL,
    finished_at_ms   INTEGER,
    reason           TEXT,
    outcome          TEXT,
    output           TEXT,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    late             INTEGER NOT NULL DEFAULT 0
);
-- What a lease and a watch look for: a node's tasks by state, oldest first.
CREATE INDEX tasks_by_node_state ON tasks(node_id, state, created_at_ms);
-- What the expiry sweep looks for.
CREATE INDEX tasks_by_lease ON tasks(state, lease_expires_ms);
