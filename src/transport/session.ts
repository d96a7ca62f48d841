import type { Logger } from 'pino';
import type { Identity } from '../auth/identity.js';
import type { ChatService } from '../chat/chat-service.js';
import type { LimitDecision } from '../chat/ports.js';
import type { Sink, Subscription } from '../chat/task.js';
import type { Metrics } from '../metrics/metrics.js';
import {
  AppError,
  toAppError,
  validateClientMessage,
  type ClientMessage,
  type ConsumerBookingItem,
  type ConsumerPageQuery,
  type ConsumerRequestItem,
  type ErrorMessage,
  type Page,
  type RequestItem,
  type RequestsListQuery,
  type ServerMessage,
} from '../protocol/index.js';

/** The marketplace lookups, as the db layer serves them. */
export interface MarketplaceLookups {
  requestsList(caller: Identity, query: RequestsListQuery): Promise<Page<RequestItem>>;
  consumerRequests(caller: Identity, query: ConsumerPageQuery): Promise<Page<ConsumerRequestItem>>;
  consumerBookings(caller: Identity, query: ConsumerPageQuery): Promise<Page<ConsumerBookingItem>>;
}

export interface SessionDeps {
  chat: ChatService;
  marketplace: MarketplaceLookups;
  frameLimit: (userId: string) => LimitDecision;
  metrics: Metrics;
  log: Logger;
}

export type Reply = (message: ServerMessage) => void;

export function errorMessage(err: unknown, id: string | undefined): ErrorMessage {
  const e = toAppError(err);
  const msg: ErrorMessage = { type: 'error', code: e.code, message: e.message };
  if (id !== undefined) msg.id = id;
  if (e.retryAfterMs !== undefined) msg.retryAfterMs = Math.max(0, Math.ceil(e.retryAfterMs));
  if (e.details !== undefined) msg.details = e.details;
  return msg;
}

/**
 * One WebSocket connection's conversation with the chat service, whatever the
 * transport (raw /ws or socket.io): rate-limit the frame, validate it, run it,
 * reply, and stream the tasks it subscribed to through `sink`.
 */
export class Session {
  private readonly subscriptions = new Map<string, Subscription>();
  private closed = false;

  constructor(
    private readonly deps: SessionDeps,
    readonly identity: Identity,
    private readonly sink: Sink,
  ) {}

  /** Handles one decoded frame. `reply` carries the direct reply (the ack callback on socket.io). */
  handle(value: unknown, reply: Reply): void {
    const { deps } = this;
    const limited = deps.frameLimit(this.identity.userId);
    const parsed = validateClientMessage(value);
    if (!limited.ok) {
      deps.metrics.rateLimited.inc({ bucket: limited.bucket });
      this.fail(
        new AppError('rate_limited', `too many messages; retry in ${limited.retryAfterMs} ms`, { retryAfterMs: limited.retryAfterMs }),
        parsed.ok ? parsed.message.id : parsed.id,
        reply,
      );
      return;
    }
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

  private dispatch(message: ClientMessage, reply: Reply): Promise<void> | void {
    const { chat, marketplace } = this.deps;
    const caller = this.identity;
    switch (message.type) {
      case 'chat.send': {
        const { type: _type, id, ...body } = message;
        const receivedAt = performance.now();
        return chat.send(caller, body, receivedAt).then(({ ack, task }) => {
          reply(this.withId({ type: 'chat.ack', ...ack }, id));
          if (this.closed) return;
          this.track(task.taskId, chat.subscribe(caller, task.taskId, 0, this.sink));
        });
      }
      case 'chat.cancel':
        chat.cancel(caller, message.taskId);
        reply(this.withId({ type: 'ok' }, message.id));
        return;
      case 'chat.resume': {
        const sub = chat.subscribe(caller, message.taskId, message.fromSeq, this.sink);
        reply(this.withId({ type: 'ok' }, message.id));
        this.track(message.taskId, sub);
        return;
      }
      case 'task.get':
        reply(this.withId({ type: 'task', task: chat.task(caller, message.taskId) }, message.id));
        return;
      case 'conversation.history': {
        const page = chat.history(caller, message.conversationId, message.before, message.limit ?? 50);
        reply(this.withId({ type: 'conversation.history', ...page }, message.id));
        return;
      }
      case 'requests.list': {
        const { type: _t, id, ...query } = message;
        return marketplace.requestsList(caller, query).then((page) => reply(this.withId({ type: 'requests.list', ...page }, id)));
      }
      case 'consumer.requests': {
        const { type: _t, id, ...query } = message;
        return marketplace.consumerRequests(caller, query).then((page) => reply(this.withId({ type: 'consumer.requests', ...page }, id)));
      }
      case 'consumer.bookings': {
        const { type: _t, id, ...query } = message;
        return marketplace.consumerBookings(caller, query).then((page) => reply(this.withId({ type: 'consumer.bookings', ...page }, id)));
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
    for (const sub of this.subscriptions.values()) sub.close();
    this.subscriptions.clear();
  }
}
