-- Conversations, their messages, and the chat tasks that produced replies.
-- Times are integer milliseconds since the epoch (UTC); the protocol renders them as ISO-8601.

CREATE TABLE conversations (
  conversation_id TEXT PRIMARY KEY,
  user_id         TEXT NOT NULL,
  created_at      INTEGER NOT NULL,
  updated_at      INTEGER NOT NULL
) STRICT;

-- Messages are ordered by their rowid (monotonic per database); message_id is the public, opaque id.
CREATE TABLE messages (
  seq             INTEGER PRIMARY KEY,
  message_id      TEXT NOT NULL UNIQUE,
  conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
  role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
  text            TEXT NOT NULL,
  task_id         TEXT,
  created_at      INTEGER NOT NULL
) STRICT;

-- History pages (conversation, before) and the model's context (latest N) walk this index backwards.
CREATE INDEX messages_by_conversation ON messages (conversation_id, seq);

CREATE TABLE tasks (
  task_id           TEXT PRIMARY KEY,
  conversation_id   TEXT NOT NULL REFERENCES conversations (conversation_id),
  user_id           TEXT NOT NULL,
  user_message_id   TEXT NOT NULL,
  status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'error', 'cancelled')),
  finish_reason     TEXT CHECK (finish_reason IN ('stop', 'length', 'cancelled')),
  error_code        TEXT,
  reply_message_id  TEXT,
  prompt_tokens     INTEGER NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
  completion_tokens INTEGER NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
  cached            INTEGER NOT NULL DEFAULT 0 CHECK (cached IN (0, 1)),
  created_at        INTEGER NOT NULL,
  finished_at       INTEGER
) STRICT;

-- Finding tasks left unfinished by a crash, at start.
CREATE INDEX tasks_unfinished ON tasks (status) WHERE status IN ('queued', 'running');
