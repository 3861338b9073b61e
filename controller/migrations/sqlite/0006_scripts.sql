-- NodeScripts the operator stores (POST /api/v1/scripts) for `node.exec` tasks to name by
-- digest (`{"script_digest": "sha256:…"}`), so a task's arguments stay small and one script
-- serves many tasks. Content-addressed: `digest` is `sha256:` and the lowercase hex SHA-256 of
-- `content` (UTF-8 text), so storing the same text again finds the row already there.
-- `created_at_ms` is when it was first stored. Nodes fetch a script only while one of their
-- leased tasks names it (GET /node_api/v1/scripts/{digest}), and check the digest themselves.
CREATE TABLE scripts (
    digest        TEXT PRIMARY KEY,
    content       TEXT NOT NULL,
    size          INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
