-- Heartbeat history is trimmed to the newest 100 rows per node (storage::HEARTBEAT_HISTORY)
-- by this trigger, inside the INSERT's own statement, so storing a heartbeat is one statement
-- instead of BEGIN, INSERT, DELETE, COMMIT. The subquery is an index range on
-- heartbeats_by_node (node_id, id) and finds nothing while a node has 100 rows or fewer.
CREATE TRIGGER heartbeats_trim AFTER INSERT ON heartbeats
BEGIN
    DELETE FROM heartbeats WHERE node_id = NEW.node_id AND id <=
        (SELECT id FROM heartbeats WHERE node_id = NEW.node_id
         ORDER BY id DESC LIMIT 1 OFFSET 100);
END;
