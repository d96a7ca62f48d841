-- What it takes to replay a finished task's stream from storage exactly as it went out live, so that a task
-- dropped from memory (retention budget, restart) stays resumable with the same seqs and chunk boundaries.
-- Written in the same group commit as the task's end (and, for a cache hit, in the commit right after its replay).

-- The length of each delta (chat.delta seq 0, 1, ...) in UTF-16 code units, as unsigned LEB128 varints, one per
-- delta; their sum is the length of the reply's text. NULL: not recorded (a task still running, or ended before this).
ALTER TABLE tasks ADD COLUMN delta_lengths BLOB;
-- chat.done timings, as sent.
ALTER TABLE tasks ADD COLUMN queue_ms REAL;
ALTER TABLE tasks ADD COLUMN first_token_ms REAL;
ALTER TABLE tasks ADD COLUMN total_ms REAL;
-- A failed task has no assistant message: the chat.error message, and the text it streamed before it failed.
ALTER TABLE tasks ADD COLUMN error_message TEXT;
ALTER TABLE tasks ADD COLUMN failed_text TEXT;
