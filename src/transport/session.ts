import type { Logger } from 'pino';
import type { Identity } from '../auth/identity.js';
import type { ChatService } from '../chat/chat-service.js';
import { followStarted } from '../chat/sync.js';
import type { NodeBus } from '../cluster/bus.js';
import type { LimitDecision } from '../chat/ports.js';
import type { Sink, Subscription, Task } from '../chat/task.js';
import type { Metrics } from '../metrics/metrics.js';
import {
  AppError,
  toAppError,
  validateClientMessage,
  type ClientMessage,
  serializePage,
  SerializedMessage,
  type ConsumerPageQuery,
  type ErrorMessage,
  type OutgoingMessage,
  type RequestsListQuery,
  type SerializedPage,
} from '../protocol/index.js';
import { randomBase64url } from '../random-id.js';

/** The marketplace lookups, as the db layer serves them: pages whose items are JSON text already (MarketplaceJsonLookups). */
export interface MarketplaceLookups {
  requestsListJson(caller: Identity, query: RequestsListQuery): Promise<SerializedPage>;
  consumerRequestsJson(caller: Identity, query: ConsumerPageQuery): Promise<SerializedPage>;
  consumerBookingsJson(caller: Identity, query: ConsumerPageQuery): Promise<SerializedPage>;
}

export interface SessionDeps {
  chat: ChatService;
  marketplace: MarketplaceLookups;
  frameLimit: (userId: string) => LimitDecision;
  /** Counts a frame of this user refused for its rate; returns the user's refusals in the current second, all connections together. */
  frameRefused: (userId: string) => number;
  /** A connection of this user is being closed for flooding (the limits then hold its reconnects back). */
  flooded?: (userId: string) => void;
  /** Takes the bytes a replay, history page or task snapshot sends from the user's egress bucket (none: not charged). */
  egress?: (userId: string, bytes: number) => { ok: true } | { ok: false; retryAfterMs: number };
  /** Where the user's chat.started notices arrive (src/chat/sync.ts): the chat service's bus. None: not heard. */
  bus?: NodeBus | undefined;
  metrics: Metrics;
  log: Logger;
}

export type Reply = (message: OutgoingMessage) => void;

/**
 * What the transport does with a frame after admit(): decode and handle it, drop it (it was answered rate_limited),
 * or drop it and close the connection (1008) for flooding.
 */
export type Admission = 'admitted' | 'refused' | 'flooding';

// A client that honours retryAfterMs is refused about as many frames as it had in flight when the first refusal
// reached it; a user refused more than this within a second, over all its connections, is ignoring the replies,
// and answering every frame it sends would let one user keep the event loop busy (docs/rate-limits.md, "Flooding").
// Counted per user, so that spreading the frames over many connections changes nothing.
export const FLOOD_REFUSALS = 256;
// Of a flooding user, a connection is closed once it has itself been refused more than this in the second: a
// connection of the same user that honours retryAfterMs (refused for the few frames it had in flight) stays.
export const FLOOD_REFUSALS_PER_CONNECTION = 16;
const FLOOD_WINDOW_MS = 1000;
/** The close code for a flooding connection: RFC 6455 1008, policy violation. */
export const FLOOD_CLOSE_CODE = 1008;

// A refused upgrade that says when to come back (a flooder's reconnect) is answered then, up to this long after:
// a client reconnecting in a loop makes a few attempts a second instead of thousands, each of which would cost
// a TCP handshake and an HTTP exchange (a tarpit). Costs nothing but the pending request meanwhile.
const REFUSAL_HOLD_MAX_MS = 1000;

/** Waits before an upgrade refusal carrying `retryAfterMs` is sent. */
export function holdRefusal(retryAfterMs: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.min(Math.max(0, retryAfterMs), REFUSAL_HOLD_MAX_MS)).unref());
}

/** The `id` an error reply echoes, read without validating the rest of the frame (the same rule as the schema's). */
export function echoableId(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const id = (value as { id?: unknown }).id;
  return typeof id === 'string' && id.length > 0 && id.length <= 64 ? id : undefined;
}

export function errorMessage(err: unknown, id: string | undefined): ErrorMessage {
  const e = toAppError(err);
  const msg: ErrorMessage = { type: 'error', code: e.code, message: e.message };
  if (id !== undefined) msg.id = id;
  if (e.retryAfterMs !== undefined) msg.retryAfterMs = Math.max(0, Math.ceil(e.retryAfterMs));
  if (e.details !== undefined) msg.details = e.details;
  return msg;
}

// What a frame adds around its text ({"type":"chat.delta","taskId":"…","seq":…,"text":""} and the like).
const FRAME_OVERHEAD_BYTES = 64;

/** Bytes a replay of `task` from `fromSeq` sends now: the deltas it already has (live ones after them are not a replay). */
export function replayBytes(task: Task, fromSeq: number): number {
  let bytes = FRAME_OVERHEAD_BYTES;
  for (let seq = fromSeq; seq < task.deltaCount; seq++) bytes += Buffer.byteLength(task.deltaAt(seq)) + FRAME_OVERHEAD_BYTES;
  return bytes;
}

/** Bytes of a history page's reply, counted from the texts it carries. */
export function historyBytes(page: { messages: readonly { text: string }[] }): number {
  let bytes = FRAME_OVERHEAD_BYTES;
  for (const m of page.messages) bytes += Buffer.byteLength(m.text) + FRAME_OVERHEAD_BYTES;
  return bytes;
}

/** Bytes of a task snapshot's reply (task.get): its whole text. */
export function taskBytes(task: { text: string }): number {
  return Buffer.byteLength(task.text) + 2 * FRAME_OVERHEAD_BYTES;
}

/** Charges `bytes` to the user's egress bucket; throws rate_limited (with retryAfterMs) when it is empty. */
export function chargeEgress(deps: Pick<SessionDeps, 'egress' | 'metrics'>, userId: string, bytes: number): void {
  const d = deps.egress?.(userId, bytes);
  if (d === undefined || d.ok) return;
  deps.metrics.rateLimited.inc({ bucket: 'egress' });
  const retryAfterMs = Math.max(0, Math.ceil(d.retryAfterMs));
  throw new AppError('rate_limited', `too many bytes of replays and history for this user; retry in ${retryAfterMs} ms`, { retryAfterMs });
}

/** A marketplace page's reply frame, serialized around the items JSON the lookup built. */
function pageReply(type: 'requests.list' | 'consumer.requests' | 'consumer.bookings', page: SerializedPage, id: string | undefined): SerializedMessage {
  return new SerializedMessage(type, serializePage(page, type, id));
}

/**
 * One WebSocket connection's conversation with the chat service, whatever the
 * transport (raw /ws or socket.io): rate-limit the frame, validate it, run it,
 * reply, and stream the tasks it subscribed to through `sink`.
 */
export class Session {
  private readonly subscriptions = new Map<string, Subscription>();
  private closed = false;
  // Frames refused since refusalsSince (a window of FLOOD_WINDOW_MS).
  private refusals = 0;
  private refusalsSince = 0;
  /** This connection among all of the user's (on every node): its own chats are not announced to it. */
  private readonly origin = randomBase64url(12);
  private readonly stopFollowing: () => void;

  constructor(
    private readonly deps: SessionDeps,
    readonly identity: Identity,
    private readonly sink: Sink,
  ) {
    const bus = deps.bus;
    this.stopFollowing =
      bus === undefined
        ? () => {}
        : followStarted(bus, identity.userId, this.origin, (started) => {
            if (!this.closed) this.sink.deliver(started);
          });
  }

  /**
   * Handles one decoded frame that admit() let through. `reply` carries the direct reply (the ack callback on
   * socket.io).
   */
  handle(value: unknown, reply: Reply): void {
    const parsed = validateClientMessage(value);
    if (!parsed.ok) {
      this.fail(parsed.error, parsed.id, reply);
      return;
    }
    const message = parsed.message;
    try {
      const pending = this.dispatch(message, reply);
      if (pending) pending.catch((err: unknown) => this.fail(err, message.id, reply));
    } catch (err) {
      this.fail(err, message.id, reply);
    }
  }

  /**
   * A frame admit() let through that cannot be a message (not JSON, binary, more structure than any message, a
   * payload that is not one object): answered bad_request with `reason`, echoing `id` when the frame had a usable one.
   */
  reject(reason: string, reply: Reply, id?: string): void {
    this.fail(new AppError('bad_request', reason), id, reply);
  }

  /**
   * Takes one frame from the user's bucket, before the frame is decoded: what a user can make the server decode
   * is bounded by its rate. An empty bucket answers rate_limited (with `id`, found by the transport's scan of the
   * raw frame) and counts toward flooding.
   */
  admit(reply: Reply, id?: string): Admission {
    const limited = this.deps.frameLimit(this.identity.userId);
    if (limited.ok) return 'admitted';
    const now = performance.now();
    if (now - this.refusalsSince > FLOOD_WINDOW_MS) {
      this.refusalsSince = now;
      this.refusals = 0;
    }
    this.refusals += 1;
    this.deps.metrics.rateLimited.inc({ bucket: limited.bucket });
    this.deps.metrics.errors.inc({ code: 'rate_limited' });
    // A flood is mostly refused frames, and each must cost as little as possible: the frame is not decoded,
    // and the reply is built directly, not through an AppError (capturing an Error's stack was most of the cost
    // of a refusal in a profile of a flood).
    const retryAfterMs = Math.max(0, Math.ceil(limited.retryAfterMs));
    const refusal: ErrorMessage = { type: 'error', code: 'rate_limited', message: `too many messages; retry in ${retryAfterMs} ms`, retryAfterMs };
    if (id !== undefined) refusal.id = id;
    reply(refusal);
    const userRefusals = this.deps.frameRefused(this.identity.userId);
    if (userRefusals <= FLOOD_REFUSALS || this.refusals <= FLOOD_REFUSALS_PER_CONNECTION) return 'refused';
    this.deps.log.warn({ userId: this.identity.userId, refusals: userRefusals }, 'closing a connection that keeps sending past its rate limit');
    this.deps.flooded?.(this.identity.userId);
    return 'flooding';
  }

  private fail(err: unknown, id: string | undefined, reply: Reply): void {
    const e = toAppError(err);
    if (e.code === 'internal') this.deps.log.error({ err: e.cause ?? e, userId: this.identity.userId }, 'request failed');
    this.deps.metrics.errors.inc({ code: e.code });
    reply(errorMessage(e, id));
  }

  private withId<T extends object>(body: T, id: string | undefined): T & { id?: string } {
    return id === undefined ? body : { ...body, id };
  }

  private track(taskId: string, sub: Subscription): void {
    this.subscriptions.get(taskId)?.close();
    if (this.subscriptions.size >= 16) {
      for (const [id, s] of this.subscriptions) if (s.closed) this.subscriptions.delete(id);
    }
    this.subscriptions.set(taskId, sub);
    sub.pump();
  }

  /** chat.send: the ack, then the task's stream through the sink. */
  private send(message: Extract<ClientMessage, { type: 'chat.send' }>, reply: Reply): Promise<void> {
    const { chat } = this.deps;
    const caller = this.identity;
    const { type: _type, id, ...body } = message;
    const receivedAt = performance.now();
    return chat.send(caller, body, receivedAt, { origin: this.origin }).then((sent) => {
      // A repeated clientMessageId: the first send's ack again; the connection follows the task with chat.resume.
      if (sent.duplicate) {
        reply(this.withId({ type: 'chat.ack', ...sent.ack }, id));
        return;
      }
      // The ack and whatever the task already has (all of a cache hit) leave in one write.
      const ackAndStream = () => {
        reply(this.withId({ type: 'chat.ack', ...sent.ack }, id));
        if (this.closed) return;
        this.track(sent.task.taskId, sent.subscribe(this.sink));
      };
      if (this.sink.cork && !this.closed) this.sink.cork(ackAndStream);
      else ackAndStream();
    });
  }

  /** chat.resume: the replay from `fromSeq` is charged to the user's egress, then streamed with what follows. */
  private async resume(message: Extract<ClientMessage, { type: 'chat.resume' }>, reply: Reply): Promise<void> {
    const caller = this.identity;
    const sub = await this.deps.chat.subscribe(caller, message.taskId, message.fromSeq, this.sink);
    if (this.closed) {
      sub.close();
      return;
    }
    try {
      chargeEgress(this.deps, caller.userId, replayBytes(sub.task, message.fromSeq));
    } catch (err) {
      sub.close();
      throw err;
    }
    reply(this.withId({ type: 'ok' }, message.id));
    this.track(message.taskId, sub);
  }

  private dispatch(message: ClientMessage, reply: Reply): Promise<void> | void {
    const { chat, marketplace } = this.deps;
    const caller = this.identity;
    switch (message.type) {
      case 'chat.send':
        return this.send(message, reply);
      case 'chat.cancel':
        return chat.cancel(caller, message.taskId).then(() => reply(this.withId({ type: 'ok' }, message.id)));
      case 'chat.resume':
        return this.resume(message, reply);
      case 'task.get':
        return chat.task(caller, message.taskId).then((task) => {
          chargeEgress(this.deps, caller.userId, taskBytes(task));
          reply(this.withId({ type: 'task', task }, message.id));
        });
      case 'conversation.history':
        return chat.history(caller, message.conversationId, message.before, message.limit ?? 50).then((page) => {
          chargeEgress(this.deps, caller.userId, historyBytes(page));
          reply(this.withId({ type: 'conversation.history', ...page }, message.id));
        });
      case 'requests.list': {
        const { type, id, ...query } = message;
        return marketplace.requestsListJson(caller, query).then((page) => reply(pageReply(type, page, id)));
      }
      case 'consumer.requests': {
        const { type, id, ...query } = message;
        return marketplace.consumerRequestsJson(caller, query).then((page) => reply(pageReply(type, page, id)));
      }
      case 'consumer.bookings': {
        const { type, id, ...query } = message;
        return marketplace.consumerBookingsJson(caller, query).then((page) => reply(pageReply(type, page, id)));
      }
      case 'conversations.list': {
        const { type, id, ...query } = message;
        return chat.conversations(caller, query).then((page) => reply(this.withId({ type, ...page }, id)));
      }
      case 'ping':
        reply(this.withId({ type: 'pong' }, message.id));
        return;
    }
  }

  /** The socket drained: send what the subscriptions held back. */
  pump(): void {
    for (const [taskId, sub] of this.subscriptions) {
      if (sub.closed) this.subscriptions.delete(taskId);
      else sub.pump();
    }
  }

  /** The connection closed: stop streaming. Tasks go on and stay resumable from another connection. */
  close(): void {
    this.closed = true;
    this.stopFollowing();
    for (const sub of this.subscriptions.values()) sub.close();
    this.subscriptions.clear();
  }
}
