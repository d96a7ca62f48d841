/**
 * Idempotent sends (PROTOCOL.md, "Sync and idempotency"): a user's second send with the same `clientMessageId` /
 * `Idempotency-Key` within 24 hours gets the first one's ack again, with nothing stored, run or charged again.
 *
 * Three guards, from the cheapest:
 * - in this process, a map of the keys in flight to the first send's promise: a repeat that arrives while the first
 *   is being checked or stored waits for it;
 * - the store: the key is written in the same commit as the message (see ChatStore.beginChat), so a repeat after a
 *   restart, or on another node, finds it;
 * - across nodes, a claim on the key (src/cluster/claims.ts) while the first send is being stored, so that a repeat
 *   arriving at another node at the same time waits for the first's row instead of racing it. The store's unique key
 *   is the final guard: the loser of a race the claims did not see reads the winner's row.
 */
import crypto from 'node:crypto';
import type { ClaimStore } from '../cluster/claims.js';
import { IDEMPOTENCY_WINDOW_MS, IdempotencyKeyTaken, type ChatStore, type IdempotencyRecord, type IdempotentSend } from '../db/chat-store.js';
import { AppError, type ChatAck } from '../protocol/index.js';
import type { ReplySource } from './chat-service.js';

/** What a keyed send asked for, to tell a repeat from a reuse of its key for another message. */
export interface KeyedRequest {
  key: string;
  requestHash: string;
  /** The conversation the send named; null: a new one. */
  requestedConversationId: string | null;
}

/** An answer to a repeated key: the first send's ack, marked, and how its reply was produced. */
export interface RepeatedAck {
  ack: Omit<ChatAck, 'type' | 'id'>;
  source: ReplySource;
}

/** What the first send with a key gives the others: its ack and source. */
interface FirstSend {
  ack: Omit<ChatAck, 'type' | 'id'>;
  source: ReplySource;
}

/** The rest of an ack the store keeps with the key (IdempotencyRecord.ack). */
interface StoredAck {
  status: ChatAck['status'];
  rateLimit: ChatAck['rateLimit'];
  source: ReplySource;
}

export function keyedRequest(key: string, text: string, conversationId: string | undefined, regenerate: boolean): KeyedRequest {
  const requestHash = crypto
    .createHash('sha256')
    .update(`${regenerate ? 'regenerate' : 'send'}\u0000${text}`)
    .digest('base64url');
  return { key, requestHash, requestedConversationId: conversationId ?? null };
}

/** The record a first send stores with its message, once its ack is known (all but the ids the commit gives). */
export function idempotencyRecord(request: KeyedRequest, ack: Pick<ChatAck, 'status' | 'rateLimit'>, source: ReplySource): IdempotencyRecord {
  const stored: StoredAck = { status: ack.status, rateLimit: ack.rateLimit, source };
  return { key: request.key, requestHash: request.requestHash, requestedConversationId: request.requestedConversationId, ack: JSON.stringify(stored) };
}

/**
 * The same message: the same text, and the same conversation (the one the first named, none for both, or the one
 * the first made, named by the repeat). Anything else reuses the key for another message: idempotency_conflict.
 */
function checkSame(request: KeyedRequest, first: { requestHash: string; requestedConversationId: string | null; conversationId: string }): void {
  const sameConversation = request.requestedConversationId === first.requestedConversationId || request.requestedConversationId === first.conversationId;
  if (request.requestHash === first.requestHash && sameConversation) return;
  throw new AppError(
    'idempotency_conflict',
    `the key ${request.key} was used for another message (${request.requestHash === first.requestHash ? 'another conversation' : 'another text'}) within the last 24 hours`,
  );
}

function repeatOfStored(stored: IdempotentSend): RepeatedAck {
  const rest = JSON.parse(stored.ack) as StoredAck;
  return {
    ack: {
      taskId: stored.taskId,
      conversationId: stored.conversationId,
      messageId: stored.messageId,
      status: rest.status,
      rateLimit: rest.rateLimit,
      duplicate: true,
    },
    source: rest.source,
  };
}

export interface IdempotentSendsOptions {
  store: ChatStore;
  /** Claims across nodes (cluster mode); none: the in-process map and the store's key are the guards. */
  claims?: ClaimStore | undefined;
  /** How long a claim holds a key while its send is being stored. */
  claimTtlMs?: number;
  /** How often a repeat waiting on another node's claim looks for its row. */
  pollMs?: number;
}

export interface IdempotentSends {
  /**
   * Runs `fresh` for the first send with `request.key` of the user; a repeat gets `repeat(ack)` of the first's ack
   * (the first send's promise when it is in flight here, else the stored record). `fresh` stores the key with its
   * message; if another send's key won the store meanwhile it throws IdempotencyKeyTaken and the winner answers.
   */
  send<T extends FirstSend>(userId: string, request: KeyedRequest, fresh: () => Promise<T>): Promise<T | RepeatedAck>;
  /** Keys in flight in this process. */
  readonly inFlight: number;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

export function createIdempotentSends(options: IdempotentSendsOptions): IdempotentSends {
  const { store, claims } = options;
  const claimTtlMs = options.claimTtlMs ?? 30_000;
  const pollMs = options.pollMs ?? 25;
  const inFlight = new Map<string, { request: KeyedRequest; result: Promise<FirstSend | RepeatedAck> }>();

  const lookup = (userId: string, key: string) => store.idempotentSend(userId, key, Date.now() - IDEMPOTENCY_WINDOW_MS);

  /** The stored send with the key, checked against the request; undefined when there is none. */
  async function storedRepeat(userId: string, request: KeyedRequest): Promise<RepeatedAck | undefined> {
    const stored = await lookup(userId, request.key);
    if (stored === undefined) return undefined;
    checkSame(request, stored);
    return repeatOfStored(stored);
  }

  /** The first send with this key in this process: the stored record, or the send itself (under a claim in a cluster). */
  async function first<T extends FirstSend>(userId: string, request: KeyedRequest, fresh: () => Promise<T>): Promise<T | RepeatedAck> {
    const found = await storedRepeat(userId, request);
    if (found !== undefined) return found;
    if (claims === undefined) return freshOrWinner(userId, request, fresh);
    const claimKey = `idem:${userId.length}:${userId}:${request.key}`;
    const holder = crypto.randomUUID();
    const deadline = performance.now() + claimTtlMs;
    for (;;) {
      const claimed = await claims.claim(claimKey, holder, claimTtlMs);
      if (claimed.won) {
        try {
          // The holder before this one may have stored its send just before it let go.
          return (await storedRepeat(userId, request)) ?? (await freshOrWinner(userId, request, fresh));
        } finally {
          claims.release(claimKey, holder).catch(() => {});
        }
      }
      // Another node is storing a send with this key: its row answers this one, or it fails and lets go.
      await sleep(pollMs);
      const stored = await storedRepeat(userId, request);
      if (stored !== undefined) return stored;
      // Past the claim's TTL the store's unique key decides.
      if (performance.now() > deadline) return freshOrWinner(userId, request, fresh);
    }
  }

  async function freshOrWinner<T extends FirstSend>(userId: string, request: KeyedRequest, fresh: () => Promise<T>): Promise<T | RepeatedAck> {
    try {
      return await fresh();
    } catch (err) {
      if (!(err instanceof IdempotencyKeyTaken)) throw err;
      const winner = await storedRepeat(userId, request);
      if (winner === undefined) throw new AppError('overloaded', 'a send with this key is being stored elsewhere; retry');
      return winner;
    }
  }

  function send<T extends FirstSend>(userId: string, request: KeyedRequest, fresh: () => Promise<T>): Promise<T | RepeatedAck> {
    const id = `${userId}\u0000${request.key}`;
    const running = inFlight.get(id);
    if (running !== undefined) {
      // A repeat while the first is in flight here: the first's ack, once it has one.
      return running.result.then(
        (firstSend) => {
          checkSame(request, { ...running.request, conversationId: firstSend.ack.conversationId });
          return { ack: { ...firstSend.ack, duplicate: true as const }, source: firstSend.source };
        },
        // Refused, or a conflict of its own: this send is decided on its own (the stored record, if any, answers it).
        () => send(userId, request, fresh),
      );
    }
    const result = first(userId, request, fresh);
    inFlight.set(id, { request, result });
    const done = () => {
      if (inFlight.get(id)?.result === result) inFlight.delete(id);
    };
    result.then(done, done);
    return result;
  }

  return {
    send,
    get inFlight() {
      return inFlight.size;
    },
  };
}

/** How often stored keys past their window are deleted, and how many per statement (a short write, often). */
export const IDEMPOTENCY_PRUNE_EVERY_MS = 10 * 60 * 1000;
export const IDEMPOTENCY_PRUNE_BATCH = 1000;

export interface IdempotencyPruning {
  /** One pass: deletes the keys past their window, a batch at a time until a batch comes back short; returns how many. */
  pruneNow(): Promise<number>;
  /** No more passes; resolves once a pass under way has stopped (after its current batch). */
  stop(): Promise<void>;
}

/**
 * Keeps the stored keys to the window: every `everyMs`, the keys stored more than IDEMPOTENCY_WINDOW_MS ago are
 * deleted, `batch` per statement (a statement's write stays short next to the chats' group commits, and the loop
 * yields to the event loop between batches). Without it the table would grow by one row per keyed send, for good.
 * In a cluster every node prunes; the deletes are idempotent.
 */
export function startIdempotencyPruning(
  store: Pick<ChatStore, 'pruneIdempotencyKeys'>,
  options: { everyMs?: number; batch?: number; onError?: (err: unknown) => void } = {},
): IdempotencyPruning {
  const batch = options.batch ?? IDEMPOTENCY_PRUNE_BATCH;
  let running: Promise<number> | null = null;
  let stopped = false;
  const pass = async (): Promise<number> => {
    const before = Date.now() - IDEMPOTENCY_WINDOW_MS;
    let total = 0;
    for (;;) {
      const deleted = await store.pruneIdempotencyKeys(before, batch);
      total += deleted;
      if (deleted < batch || stopped) return total;
      await new Promise((resolve) => setImmediate(resolve));
    }
  };
  const pruneNow = () => {
    running ??= pass().finally(() => {
      running = null;
    });
    return running;
  };
  const timer = setInterval(() => {
    if (running !== null) return;
    // A store that cannot be written now (full disk, PostgreSQL unreachable) is reported by /readyz; the next pass retries.
    pruneNow().catch((err: unknown) => options.onError?.(err));
  }, options.everyMs ?? IDEMPOTENCY_PRUNE_EVERY_MS);
  timer.unref();
  return {
    pruneNow,
    async stop() {
      stopped = true;
      clearInterval(timer);
      await running?.catch(() => {});
    },
  };
}
