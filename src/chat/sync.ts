/**
 * Sync across a user's connections (PROTOCOL.md, "Sync and idempotency"): the conversation list, and `chat.started`,
 * the notice every other socket of the user gets when one of its chats is acknowledged.
 *
 * chat.started goes through the node bus only (src/cluster/bus.ts), on the user's channel: the embedded bus delivers
 * it in this process, the Redis bus to the user's sockets on every node, and the code here is the same for both.
 */
import crypto from 'node:crypto';
import type { Identity } from '../auth/identity.js';
import type { NodeBus } from '../cluster/bus.js';
import type { ChatStore, ConversationPosition } from '../db/chat-store.js';
import { AppError, type ChatStarted, type ConversationItem, type ConversationsListQuery, type Page } from '../protocol/index.js';

/** The bus channel of a user's chat.started notices. */
export const userChannel = (userId: string): string => `user:${userId}`;

/** What goes over the bus: the notice, and the connection that sent the chat (which does not hear of it). */
interface StartedNotice {
  origin: string | null;
  started: ChatStarted;
}

/** Tells every connection of the user but `origin` (none: a chat sent over HTTP) that the chat was acknowledged. */
export function announceStarted(bus: NodeBus, userId: string, started: ChatStarted, origin: string | undefined): Promise<boolean> {
  const notice: StartedNotice = { origin: origin ?? null, started };
  return bus.publish(userChannel(userId), JSON.stringify(notice));
}

/** Calls `deliver` with the chat.started of the user's chats sent from anywhere but `origin`, until the returned function is called. */
export function followStarted(bus: NodeBus, userId: string, origin: string, deliver: (started: ChatStarted) => void): () => void {
  return bus.subscribe(userChannel(userId), (message) => {
    const notice = JSON.parse(message) as StartedNotice;
    if (notice.origin !== origin) deliver(notice.started);
  });
}

// ---------- conversations.list ----------

const LOOKUP = 'conversations.list';
const TAG_CHARS = 12;
const CURSOR_RE = /^([A-Za-z0-9_-]{1,1400})\.([A-Za-z0-9_-]{12})$/;

/** The tag of a cursor, in the house style of src/marketplace/cursor.ts: a cursor of another user's list, or an edited one, is refused. */
function tag(scope: string, body: string): string {
  return crypto.createHash('sha256').update(`${LOOKUP}\u0000${scope}\u0000${body}`).digest('base64url').slice(0, TAG_CHARS);
}

/** `<base64url(JSON [lastMessageAt ms, conversationId])>.<tag>`. */
export function encodeConversationCursor(userId: string, position: ConversationPosition): string {
  const body = Buffer.from(JSON.stringify([position.updatedAt, position.conversationId])).toString('base64url');
  return `${body}.${tag(userId, body)}`;
}

function invalid(reason: string): AppError {
  return new AppError('bad_request', `invalid cursor: ${reason}`, { details: [{ path: 'cursor', message: reason }] });
}

export function decodeConversationCursor(userId: string, cursor: string): ConversationPosition {
  const m = CURSOR_RE.exec(cursor);
  if (!m) throw invalid('not a cursor');
  const [, body, given] = m as unknown as [string, string, string];
  if (tag(userId, body) !== given) throw invalid('not a cursor of this list (or it was changed)');
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
  } catch {
    throw invalid('not a cursor');
  }
  if (!Array.isArray(value) || value.length !== 2 || !Number.isSafeInteger(value[0]) || value[0] < 0 || typeof value[1] !== 'string') {
    throw invalid('not a cursor');
  }
  return { updatedAt: value[0] as number, conversationId: value[1] as string };
}

export const DEFAULT_CONVERSATIONS_LIMIT = 20;

/** A page of the caller's conversations, newest activity first: one index range of limit + 1 rows. */
export async function conversationsPage(store: ChatStore, caller: Identity, query: ConversationsListQuery): Promise<Page<ConversationItem>> {
  const limit = query.limit ?? DEFAULT_CONVERSATIONS_LIMIT;
  const after = query.cursor === undefined ? undefined : decodeConversationCursor(caller.userId, query.cursor);
  const rows = await store.conversations(caller.userId, after, limit + 1);
  const page = rows.slice(0, limit);
  const last = page.at(-1);
  return {
    items: page.map((r) => ({
      conversationId: r.conversationId,
      title: r.title,
      lastMessageAt: new Date(r.updatedAt).toISOString(),
      messageCount: r.messageCount,
    })),
    nextCursor: rows.length > limit && last !== undefined ? encodeConversationCursor(caller.userId, last) : null,
  };
}
