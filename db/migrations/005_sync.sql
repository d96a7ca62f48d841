-- Sync and idempotency (PROTOCOL.md): the conversation list and idempotent sends.

-- conversations.list reads one range of this index, newest activity first: title and message_count are kept on the
-- conversation row by the writes that add its messages, so a page needs no per-row subquery.
-- title: the first user message, cut to at most 80 characters ('' until it has one).
ALTER TABLE conversations ADD COLUMN title TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0 CHECK (message_count >= 0);

UPDATE conversations SET
  message_count = (SELECT count(*) FROM messages m WHERE m.conversation_id = conversations.conversation_id),
  title = coalesce(
    (SELECT substr(m.text, 1, 80) FROM messages m WHERE m.conversation_id = conversations.conversation_id AND m.role = 'user' ORDER BY m.seq LIMIT 1),
    '');

-- The covering index of conversations.list: (user, updated_at, conversation_id) walked backwards, the rest read from it.
CREATE INDEX conversations_by_user ON conversations (user_id, updated_at, conversation_id, title, message_count);

-- A user's clientMessageId / Idempotency-Key and the send it named, written in the same commit as the message: a
-- retry within 24 hours (on this process after a restart, or on another node) finds it here. The primary key is the
-- final guard against two sends with one key; a row older than 24 hours is taken over by the next send with its key.
CREATE TABLE idempotency_keys (
  user_id         TEXT NOT NULL,
  client_key      TEXT NOT NULL,
  -- What the send asked for (its text and whether it regenerated), hashed: a reuse for another message is a conflict.
  request_hash    TEXT NOT NULL,
  -- The conversation the send named (NULL: a new one).
  requested_conversation_id TEXT,
  task_id         TEXT NOT NULL,
  conversation_id TEXT NOT NULL,
  message_id      TEXT NOT NULL,
  -- The rest of the first send's ack ({status, rateLimit, source}) as JSON: a repeat is answered with it.
  ack             TEXT NOT NULL,
  created_at      INTEGER NOT NULL,
  PRIMARY KEY (user_id, client_key)
) STRICT, WITHOUT ROWID;
