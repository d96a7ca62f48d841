-- What it takes to replay a finished task's stream from storage exactly as it went out live (the schema of
-- db/migrations/004_task_replay.sql for PostgreSQL), and the node that runs each task (cluster mode).
-- Written in the same group commit as the task's end (and, for a cache hit, in the commit right after its replay).

-- The length of each delta (chat.delta seq 0, 1, ...) in UTF-16 code units, as unsigned LEB128 varints, one per
-- delta; their sum is the length of the reply's text. NULL: not recorded (a task still running, or ended before this).
ALTER TABLE tasks ADD COLUMN delta_lengths bytea;
-- chat.done timings, as sent (double precision: SQLite's REAL, so a replay sends the same numbers).
ALTER TABLE tasks ADD COLUMN queue_ms double precision;
ALTER TABLE tasks ADD COLUMN first_token_ms double precision;
ALTER TABLE tasks ADD COLUMN total_ms double precision;
-- A failed task has no assistant message: the chat.error message, and the text it streamed before it failed.
ALTER TABLE tasks ADD COLUMN error_message text;
ALTER TABLE tasks ADD COLUMN failed_text text;
-- The node that began the task (its nodeId in hello; NULL for tasks stored before this). When a node dies its
-- unfinished tasks are failed by this; a node restarted with the same id recovers its own.
ALTER TABLE tasks ADD COLUMN node_id text;
CREATE INDEX tasks_unfinished_by_node ON tasks (node_id) WHERE status IN ('queued', 'running');
