-- Sync and idempotency (PROTOCOL.md): the schema of db/migrations/005_sync.sql for PostgreSQL.

-- conversations.list reads one range of this index, newest activity first: title and message_count are kept on the
-- conversation row by the writes that add its messages, so a page needs no per-row subquery.
-- title: the first user message, cut to at most 80 characters ('' until it has one).
ALTER TABLE conversations ADD COLUMN title text NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN message_count integer NOT NULL DEFAULT 0 CHECK (message_count >= 0);

UPDATE conversations c SET
  message_count = (SELECT count(*) FROM messages m WHERE m.conversation_id = c.conversation_id),
  title = coalesce(
    (SELECT substr(m.text, 1, 80) FROM messages m WHERE m.conversation_id = c.conversation_id AND m.role = 'user' ORDER BY m.seq LIMIT 1),
    '');

-- The index of conversations.list: (user, updated_at, conversation_id) walked backwards, index-only.
-- conversation_id in "C" order: the byte order SQLite pages in, whatever the database's collation.
CREATE INDEX conversations_by_user ON conversations (user_id, updated_at, conversation_id COLLATE "C") INCLUDE (title, message_count);

-- A user's clientMessageId / Idempotency-Key and the send it named, written in the same commit as the message: a
-- retry within 24 hours (after a restart, or on another node) finds it here. The primary key is the final guard
-- against two sends with one key; a row older than 24 hours is taken over by the next send with its key.
CREATE TABLE idempotency_keys (
  user_id         text NOT NULL,
  client_key      text NOT NULL,
  request_hash    text NOT NULL,
  requested_conversation_id text,
  task_id         text NOT NULL,
  conversation_id text NOT NULL,
  message_id      text NOT NULL,
  ack             text NOT NULL,
  created_at      bigint NOT NULL,
  PRIMARY KEY (user_id, client_key)
);
