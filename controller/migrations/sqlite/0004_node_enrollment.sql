-- The node's enrollment and certificate rotation as its heartbeats report them
-- (HeartbeatRequest.enrollment): a JSON object (node_api::EnrollmentReport), NULL until a
-- heartbeat carries one. Kept on the node, not only in the heartbeat history, so `node show`
-- and queries ("whose rotation is failing?") read one row. `enrollment_at_ms` is when the
-- stored report last changed; a heartbeat that reports the same thing writes nothing.
ALTER TABLE nodes ADD COLUMN enrollment TEXT;
ALTER TABLE nodes ADD COLUMN enrollment_at_ms INTEGER;
