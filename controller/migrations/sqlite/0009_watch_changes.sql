-- What a held watch waits on — a node's desired-state generation and whether it has queued
-- tasks — written down as it changes, one row per change naming the node, by the triggers
-- below. The watch scanner reads the rows past the last it saw and looks again at those nodes
-- alone: a heartbeat, which changes neither, costs the scanner nothing (PRAGMA data_version,
-- which it read before, moves with every commit, and made it read every node's state ten
-- times a second under load). The scanner deletes the rows it has read.
CREATE TABLE watch_changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL
);

CREATE TRIGGER desired_state_watch_insert AFTER INSERT ON desired_state
BEGIN
    INSERT INTO watch_changes (node_id) VALUES (NEW.node_id);
END;

CREATE TRIGGER desired_state_watch_update AFTER UPDATE OF generation ON desired_state
    WHEN NEW.generation IS NOT OLD.generation
BEGIN
    INSERT INTO watch_changes (node_id) VALUES (NEW.node_id);
END;

CREATE TRIGGER tasks_watch_insert AFTER INSERT ON tasks WHEN NEW.state = 'queued'
BEGIN
    INSERT INTO watch_changes (node_id) VALUES (NEW.node_id);
END;

CREATE TRIGGER tasks_watch_update AFTER UPDATE OF state ON tasks
    WHEN (OLD.state = 'queued') <> (NEW.state = 'queued')
BEGIN
    INSERT INTO watch_changes (node_id) VALUES (NEW.node_id);
END;

CREATE TRIGGER tasks_watch_delete AFTER DELETE ON tasks WHEN OLD.state = 'queued'
BEGIN
    INSERT INTO watch_changes (node_id) VALUES (OLD.node_id);
END;
