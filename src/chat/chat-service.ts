import type { Logger } from 'pino';
import type { Identity } from '../auth/identity.js';
import type { NodeBus } from '../cluster/bus.js';
import type { ClaimStore } from '../cluster/claims.js';
import {
  IdempotencyKeyTaken,
  newTaskId,
  type BeganChat,
  type BeginChat,
  type ChatStore,
  type ContextMessage,
  type LastUserTurn,
  type StoredTask,
} from '../db/chat-store.js';
import { describeStorageError } from '../db/storage-health.js';
import type { ModelPool, ModelRun, PoolSlot } from '../llm/pool.js';
import { countTokens, type ModelMessage, type ModelRequest, type ModelResult } from '../llm/provider.js';
import type { Metrics } from '../metrics/metrics.js';
import {
  AppError,
  isAppError,
  toAppError,
  type CacheMode,
  type ChatAck,
  type ChatDone,
  type ChatSendBody,
  type ErrorCode,
  type ConversationItem,
  type ConversationsListQuery,
  type HistoryMessage,
  type Page,
  type TaskInfo,
} from '../protocol/index.js';
import { Flight, type FlightListener, type FlightOutcome } from './flight.js';
import { createIdempotentSends, idempotencyRecord, keyedRequest, type KeyedRequest, type RepeatedAck } from './idempotency.js';
import type { ChatCache, ChatLimits, LimitDecision, TokenReservation } from './ports.js';
import { createRetention } from './retention.js';
import { statusOf, type TaskLog, type TaskLogTerminal, type TaskLogWriter } from '../cluster/task-log.js';
import { randomBase64url } from '../random-id.js';
import { announceStarted, conversationsPage } from './sync.js';
import { PumpScheduler, Task, type Sink, type Subscription } from './task.js';

export interface ChatServiceOptions {
  store: ChatStore;
  pool: ModelPool;
  cache: ChatCache;
  limits: ChatLimits;
  metrics: Metrics;
  log: Logger;
  provider: string;
  model: string;
  /** Earlier messages of the conversation put in the model's context. */
  contextMessages: number;
  /** Model tokens reserved for a chat that does not set maxTokens. */
  defaultMaxTokens: number;
  /** Whether the provider is told maxTokens when the client did not set it (caps the reservation). */
  capUnsetMaxTokens: boolean;
  taskRetentionMs: number;
  /** Bytes of finished tasks kept in memory for resume; past it the oldest are resumed from storage instead. */
  taskRetentionMaxBytes: number;
  /** Chats of one user in flight (acknowledged or being stored, and not ended); past it: rate_limited. */
  maxRunningPerUser: number;
  /**
   * Cluster mode: the task log that readers on other nodes follow. Every task of this node is published to it, and
   * a task this node does not have in memory is looked for in it (resume, task.get, cancel on any node).
   */
  taskLog?: TaskLog;
  /**
   * Cluster mode: single-flight across nodes. The first node to claim a request's key runs the call and publishes
   * its chunks to a log of their own (in `taskLog`); identical requests on other nodes follow that log instead of
   * calling the model. `claimMs` bounds a claim (the longest a model call may run).
   */
  sharedFlights?: { claims: ClaimStore; claimMs: number };
  /** Where chat.started goes to the user's other connections (src/chat/sync.ts); none: not announced. */
  bus?: NodeBus | undefined;
  /** Claims on idempotency keys across nodes (src/chat/idempotency.ts); none: this process's map and the store. */
  claims?: ClaimStore | undefined;
}

/** What a transport asks of send() beyond a chat.send body. */
export interface SendOptions {
  /** Create `conversationId` for the caller when it does not exist (see BeginChat.createConversation): the AI SDK's chat ids. */
  createConversation?: boolean;
  /**
   * A new reply to the conversation's last user message instead of a new message: `text` is not used, no user
   * message is stored, and the context is the stored history before that message.
   */
  regenerate?: boolean;
  /**
   * The model's whole context before the user message, given by the caller (the OpenAI-compatible route): the
   * conversation's stored history is then not read. Only the user message and the reply are stored.
   */
  context?: readonly ModelMessage[];
  /** The connection that sends the chat: every other connection of the user hears chat.started (none: all of them). */
  origin?: string;
}

/** How a send's reply is produced: a cache hit, a model call of its own, or a call in flight that it joined. */
export type ReplySource = 'cache' | 'model' | 'joined';

/** A send: a new chat (FreshSend), or a repeat of a clientMessageId / Idempotency-Key answered with the first's ack. */
export type SendResult = FreshSend | RepeatedSend;

/** A repeated key: nothing was stored or run; the first send's task is followed with subscribe(). */
export interface RepeatedSend extends RepeatedAck {
  duplicate: true;
}

export interface FreshSend {
  duplicate: false;
  ack: Omit<ChatAck, 'type' | 'id'>;
  task: Task;
  source: ReplySource;
  /** The sender's stream of its own task from seq 0, with no lookup: the ack and what the task has can leave in one write. */
  subscribe(sink: Sink): Subscription;
}

/**
 * The chat service. Every store it calls answers asynchronously (SQLite at once, PostgreSQL and Redis across the
 * network); what must not interleave with another chat's steps (the running cap, single-flight) is done with no
 * await in between, and a task in memory is answered without touching storage.
 */
export interface ChatService {
  /** Validated, limited and committed; resolves with the ack. The model call starts at once, alongside the commit; the ack never waits for it. */
  send(caller: Identity, body: Omit<ChatSendBody, 'id'>, receivedAt?: number, options?: SendOptions): Promise<SendResult>;
  cancel(caller: Identity, taskId: string): Promise<void>;
  /** Streams a task to `sink` from `fromSeq`: replays, then live, then its chat.done or chat.error. Call pump() to start. */
  subscribe(caller: Identity, taskId: string, fromSeq: number, sink: Sink): Promise<Subscription>;
  task(caller: Identity, taskId: string): Promise<TaskInfo>;
  history(caller: Identity, conversationId: string, before: string | undefined, limit: number): Promise<{ messages: HistoryMessage[]; hasMore: boolean }>;
  /**
   * The id of the conversation's latest task while it streams (until its chat.done or chat.error is sent), else
   * null; also null for a conversation that does not exist. Another user's conversation: forbidden.
   */
  streamingTask(caller: Identity, conversationId: string): Promise<string | null>;
  /** The caller's conversations, newest activity first (src/chat/sync.ts). */
  conversations(caller: Identity, query: ConversationsListQuery): Promise<Page<ConversationItem>>;
  /** Stops taking chats, cancels running tasks, and resolves when their outcomes are stored. */
  close(): Promise<void>;
}

const round = (ms: number) => Math.max(0, Math.round(ms * 100) / 100);
const shuttingDown = () => new AppError('overloaded', 'the server is shutting down');

/**
 * How a send's reply will be produced, decided before anything is stored: a hit, a call in flight to join (held from
 * the tick it was found), or a call of its own with a place in the pool (its flight open to joiners, not started).
 */
type ReplyPlan =
  | { kind: 'cached'; chunks: string[]; result: ModelResult }
  | { kind: 'join'; flight: Flight }
  | { kind: 'run'; flight: Flight; slot: PoolSlot; request: ModelRequest; writeCache: boolean };

/** A send that passed every check, before its commit: what it holds, given back if the commit fails. */
interface PreparedSend {
  plan: ReplyPlan;
  /** The call it streams from (held), or null for a hit. */
  flight: Flight | null;
  reservation: TokenReservation | null;
  chat: Extract<LimitDecision, { ok: true }>;
  promptTokens: number;
  /** The user message: the send's text, or for a regenerated reply the stored one it answers again (replyTo). */
  text: string;
  replyTo: string | undefined;
}

/** How a task ended, from its flight's outcome (or a cancel). */
interface Ending {
  status: 'done' | 'cancelled' | 'error';
  result: ModelResult | null;
  error: AppError | null;
}

function endingOf(outcome: FlightOutcome | { kind: 'cancelled' }): Ending {
  if (outcome.kind === 'error') return { status: 'error', result: null, error: outcome.error };
  if (outcome.kind === 'cancelled' || outcome.cancelled) return { status: 'cancelled', result: null, error: null };
  return { status: 'done', result: outcome.result, error: null };
}

/** How many times (50 ms apart) a reader looks for the log of a task that storage says is running. */
const LOG_OPEN_TRIES = 20;

/** A flight's outcome as the terminal message of its flight log. */
function flightTerminal(id: string, outcome: FlightOutcome): TaskLogTerminal {
  if (outcome.kind === 'error')
    return { type: 'chat.error', taskId: id, code: outcome.error.code, message: outcome.error.message, retryable: outcome.error.retryable };
  const { result, cancelled } = outcome;
  return {
    type: 'chat.done',
    taskId: id,
    messageId: id,
    finishReason: cancelled || result === null ? 'cancelled' : result.finishReason,
    usage: result?.usage ?? { promptTokens: 0, completionTokens: 0 },
    cached: false,
    timings: { queueMs: 0, firstTokenMs: null, totalMs: 0 },
  };
}

/** The outcome a flight log's terminal message stands for. */
function outcomeOf(terminal: TaskLogTerminal): FlightOutcome {
  if (terminal.type === 'chat.error') return { kind: 'error', error: new AppError(terminal.code as ErrorCode, terminal.message) };
  if (terminal.finishReason === 'cancelled') return { kind: 'end', result: null, cancelled: true };
  return { kind: 'end', result: { finishReason: terminal.finishReason, usage: terminal.usage, usageSource: 'reported' }, cancelled: false };
}

export function createChatService(options: ChatServiceOptions): ChatService {
  const { store, pool, cache, limits, metrics, log } = options;
  const deltasSent = metrics.deltasSent.tally();
  const countDelta = () => deltasSent.inc();
  const tasks = new Map<string, Task>();
  // Cluster mode: tasks of other nodes that readers here follow (see followRemote).
  const remote = new Map<string, Task>();
  // The latest task of each conversation, while it streams (streamingTask).
  const latestByConversation = new Map<string, Task>();
  const running = new Set<Task>();
  const flights = new Map<string, Flight>();
  const pendingFinishes = new Set<Promise<unknown>>();
  // Sends from their first check to their ack or refusal: shutdown waits for them.
  const pendingSends = new Set<Promise<unknown>>();
  // Live deltas of this service's tasks go out once per event-loop turn (see PumpScheduler).
  const pumps = new PumpScheduler();
  // Finished tasks stay in memory up to a byte budget and their retention window; past either, from storage.
  const retention = createRetention({
    store,
    maxBytes: options.taskRetentionMaxBytes,
    retentionMs: options.taskRetentionMs,
    forget: (t) => {
      if (tasks.get(t.taskId) === t) tasks.delete(t.taskId);
    },
    onBytes: (bytes) => metrics.retainedTaskBytes.set(bytes),
  });
  // Chats in flight per user: counted from the moment a send passes its checks (before its commit) to its end.
  const chatsInFlight = new Map<string, number>();
  // Moving average of how long a model chat takes, for the retryAfterMs of a send refused by the running cap.
  let avgChatMs = 1000;
  let closing = false;
  const idempotent = createIdempotentSends({ store, claims: options.claims });

  function releaseInFlight(userId: string): void {
    const n = (chatsInFlight.get(userId) ?? 1) - 1;
    if (n > 0) chatsInFlight.set(userId, n);
    else chatsInFlight.delete(userId);
  }

  function checkRunningCap(userId: string): void {
    const held = chatsInFlight.get(userId) ?? 0;
    if (held < options.maxRunningPerUser) return;
    // One of the user's chats is likely to end within about one chat's time.
    const retryAfterMs = Math.min(60_000, Math.max(100, Math.round(avgChatMs)));
    metrics.rateLimited.inc({ bucket: 'running' });
    throw new AppError('rate_limited', `${held} chats in flight, the most one user may have; retry in ${retryAfterMs} ms`, { retryAfterMs });
  }

  /** The caller's task: from memory without touching storage, or else from storage (a Task that replays, or the stored row past its window). */
  async function ownTask(caller: Identity, taskId: string): Promise<Task | StoredTask> {
    const found = tasks.get(taskId) ?? remote.get(taskId) ?? (await retention.restore(taskId));
    if (!found) throw new AppError('not_found', `no task ${taskId}`);
    if (found.userId !== caller.userId) throw new AppError('forbidden', 'this task belongs to another user');
    return found;
  }

  /** A stored task that has not ended runs on another node (cluster mode): only the task log can stream it. */
  const unfinished = (found: Task | StoredTask): found is StoredTask => !(found instanceof Task) && (found.status === 'queued' || found.status === 'running');

  /** The caller's task as one that can be streamed (subscribed to, cancelled). */
  async function visibleTask(caller: Identity, taskId: string): Promise<Task> {
    const found = await ownTask(caller, taskId);
    if (found instanceof Task) return found;
    if (unfinished(found)) {
      const mirror = await followRemote(taskId);
      if (mirror !== undefined) return mirror;
      throw new AppError('not_found', `task ${taskId} runs on a node this one cannot reach now`);
    }
    throw new AppError('not_found', `task ${taskId} is no longer resumable (past its retention window)`);
  }

  /**
   * A task running on another node, as a local Task fed from its log: its deltas with their seqs, then its end.
   * One per task on this node however many readers it has; forgotten at its end (storage has it from then on).
   */
  async function followRemote(taskId: string): Promise<Task | undefined> {
    const log = options.taskLog;
    if (log === undefined) return undefined;
    // Storage says it runs: its node acknowledged it, and opens its log without holding the ack for it. A reader
    // as quick as the ack gives the log a moment to appear.
    let meta = await log.meta(taskId);
    for (let tries = 0; meta === undefined && tries < LOG_OPEN_TRIES && !remote.has(taskId); tries++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      meta = await log.meta(taskId);
    }
    const known = remote.get(taskId);
    if (known !== undefined) return known;
    if (meta === undefined) return undefined;
    const mirror = new Task(taskId, meta.userId, meta.conversationId, performance.now(), meta.createdAt, false, pumps);
    if (meta.status === 'running') mirror.markRunning();
    remote.set(taskId, mirror);
    const stop = log.follow(taskId, 0, {
      delta: (_seq, text) => mirror.pushDelta(text, false),
      end: (terminal) => {
        remote.delete(taskId);
        mirror.beginEnding();
        mirror.end(terminal, statusOf(terminal));
        queueMicrotask(stop);
      },
      gone: () => {
        remote.delete(taskId);
        mirror.beginEnding();
        const message = 'the task log is gone (past its retention window, or Redis lost it)';
        mirror.end({ type: 'chat.error', taskId, code: 'not_found', message, retryable: false }, 'error');
      },
    });
    return mirror;
  }

  /** The last user message of the caller's conversation (checked already) and its context, for a regenerated reply. */
  async function lastUserTurn(caller: Identity, conversationId: string | undefined): Promise<LastUserTurn> {
    if (conversationId === undefined) throw new AppError('bad_request', 'a regenerated reply needs its conversation');
    const [owner, turn] = await Promise.all([store.conversationOwner(conversationId), store.lastUserTurn(conversationId, options.contextMessages)]);
    checkConversationOwner(caller, conversationId, owner);
    if (turn === undefined) throw new AppError('not_found', 'the conversation has no user message to answer again');
    return turn;
  }

  function buildRequest(body: Omit<ChatSendBody, 'id'>, earlier: readonly ModelMessage[]): ModelRequest {
    const messages: ModelMessage[] = [];
    if (body.params?.system) messages.push({ role: 'system', content: body.params.system });
    messages.push(...earlier, { role: 'user', content: body.text });
    const maxTokens = body.params?.maxTokens ?? (options.capUnsetMaxTokens ? options.defaultMaxTokens : undefined);
    return {
      model: body.model ?? options.model,
      messages,
      temperature: body.params?.temperature,
      maxTokens,
    };
  }

  /** Ends a task once: stores the reply (or the failure), then sends chat.done / chat.error to its subscribers. */
  function finishTask(
    task: Task,
    outcome: FlightOutcome | { kind: 'cancelled' },
    reservation: TokenReservation | null,
    promptTokens: number,
    storedReplyId?: string,
  ): void {
    if (!task.beginEnding()) return;
    stopCounting(task);
    const endedAt = performance.now();
    const ending = endingOf(outcome);
    const completionTokens = ending.result?.usage.completionTokens ?? countTokens(task.text);
    const usage = { promptTokens: ending.result?.usage.promptTokens ?? promptTokens, completionTokens };
    reservation?.settle(completionTokens);
    metrics.tokensStreamed.inc(completionTokens);
    metrics.tasks.inc({ outcome: task.cached ? 'cached' : ending.status });
    const timings = {
      queueMs: round((task.startedAt ?? endedAt) - task.receivedAt),
      firstTokenMs: task.firstTokenAt === null ? null : round(task.firstTokenAt - task.receivedAt),
      totalMs: round(endedAt - task.receivedAt),
    };
    const stored = storeEnd(task, ending, usage, timings, storedReplyId).finally(() => {
      pendingFinishes.delete(stored);
      if (latestByConversation.get(task.conversationId) === task) latestByConversation.delete(task.conversationId);
      retention.keepEnded(task);
    });
    pendingFinishes.add(stored);
  }

  /** The task no longer counts as running: not for the user's cap, not for shutdown, not for the average chat time. */
  function stopCounting(task: Task): void {
    running.delete(task);
    releaseInFlight(task.userId);
    if (!task.cached) avgChatMs += (performance.now() - task.receivedAt - avgChatMs) / 8;
    // Its cancel closure holds the flight (every chunk, the request and its context): a retained task must not.
    cancels.delete(task);
  }

  /**
   * Stores the task's end, then sends it. The chunk boundaries and timings are stored with the end, so a resume
   * from storage sends the same frames; a cache hit's reply was stored with its question, so only they are written.
   */
  function storeEnd(task: Task, ending: Ending, usage: ChatDone['usage'], timings: ChatDone['timings'], storedReplyId: string | undefined): Promise<unknown> {
    const deltaEnds = task.deltaEnds();
    const answered = storedReplyId !== undefined && ending.status === 'done';
    const recorded = answered
      ? store.recordReplay(task.taskId, deltaEnds, timings).catch((err: unknown) => {
          log.warn(
            { taskId: task.taskId, userId: task.userId, err },
            'storing the chunk boundaries of a cached reply failed; it is resumable only from memory',
          );
        })
      : undefined;
    const { status, result, error } = ending;
    const committed = answered
      ? Promise.resolve<string | null>(storedReplyId)
      : store.finishTask({
          taskId: task.taskId,
          conversationId: task.conversationId,
          status,
          text: task.text,
          finishReason: status === 'cancelled' ? 'cancelled' : (result?.finishReason ?? undefined),
          errorCode: error?.code,
          promptTokens: usage.promptTokens,
          completionTokens: usage.completionTokens,
          cached: task.cached,
          deltaEnds,
          timings,
          errorMessage: error?.message,
        });
    return committed
      .then(
        (messageId) => sendEnd(task, ending, messageId, usage, timings),
        (err: unknown) => sendStorageFailure(task, err),
      )
      .then(() => recorded);
  }

  /** chat.done once the reply is stored; chat.error for a failed task or a reply that could not be stored. */
  function sendEnd(task: Task, ending: Ending, messageId: string | null, usage: ChatDone['usage'], timings: ChatDone['timings']): void {
    if (ending.error !== null || messageId === null) {
      const e = ending.error ?? new AppError('internal', 'the reply could not be stored');
      if (e.code === 'internal' || e.code === 'worker_failed') {
        log.warn({ taskId: task.taskId, userId: task.userId, code: e.code, err: e.cause ?? e.message }, 'chat task failed');
      }
      metrics.errors.inc({ code: e.code });
      task.end({ type: 'chat.error', taskId: task.taskId, code: e.code, message: e.message, retryable: e.retryable }, 'error');
      return;
    }
    const finishReason = ending.status === 'cancelled' ? 'cancelled' : (ending.result?.finishReason ?? 'stop');
    task.end({ type: 'chat.done', taskId: task.taskId, messageId, finishReason, usage, cached: task.cached, timings }, ending.status);
  }

  function sendStorageFailure(task: Task, err: unknown): void {
    log.error({ taskId: task.taskId, userId: task.userId, err }, 'storing the reply failed');
    metrics.errors.inc({ code: 'internal' });
    const storage = describeStorageError(err);
    const message =
      storage === undefined ? 'the reply could not be stored' : `the reply could not be stored (storage unavailable: ${storage}); the question is stored`;
    task.end({ type: 'chat.error', taskId: task.taskId, code: 'internal', message, retryable: false }, 'error');
  }

  /**
   * A flight for `key`, registered at once so that identical chats join it, and held for the chat that opens it.
   * Its model call starts (startCall) as soon as that chat passes its limits, before its commit: handing the call
   * to a worker and the upstream's first bytes overlap the group commit of the question instead of waiting for it.
   * The chat is acknowledged only after its commit, as ever; if the commit fails the chat lets go of the flight,
   * and a call nobody else holds is cancelled. `key` null: not shared (bypass, or not cacheable).
   */
  function openFlight(key: string | null): Flight {
    const flight = new Flight(key, (f) => {
      if (f.key !== null && flights.get(f.key) === f) flights.delete(f.key);
    });
    if (key !== null) flights.set(key, flight);
    flight.hold();
    return flight;
  }

  function startCall(plan: Extract<ReplyPlan, { kind: 'run' }>): void {
    const run = startRun(plan.flight, plan.request, plan.slot, plan.writeCache);
    plan.flight.setCancel(() => run.cancel());
  }

  function startRun(flight: Flight, request: ModelRequest, slot: PoolSlot, writeCache: boolean): ModelRun {
    const key = flight.key;
    return slot.run(request, {
      onStart: () => flight.started(),
      onChunk: (text) => flight.chunk(text),
      onEnd: (result, cancelled) => {
        // An uncacheable reply (see ModelResult) leaves the cache as it was, as a failed or cancelled one does.
        if (writeCache && key !== null && !cancelled && result !== null && result.uncacheable === undefined) {
          try {
            cache.put(key, { chunks: flight.chunks, finishReason: result.finishReason, usage: result.usage });
          } catch (err) {
            log.warn({ err }, 'writing the response cache failed');
          }
        }
        flight.settle({ kind: 'end', result, cancelled });
      },
      onError: (error) => flight.settle({ kind: 'error', error }),
    });
  }

  function listen(task: Task, flight: Flight, reservation: TokenReservation | null, promptTokens: number, storedReplyId?: string, joined = false): void {
    const listener: FlightListener & { cancel(): void } = {
      onStart: () => {
        task.noteStarted(flight.startedAt ?? performance.now());
        task.markRunning();
      },
      onChunk: (text, replayed) => {
        const first = task.firstTokenAt === null;
        task.noteStarted(flight.startedAt ?? performance.now());
        task.pushDelta(text, !replayed);
        if (first && task.firstTokenAt !== null) metrics.firstToken.observe({ cached: String(task.cached) }, (task.firstTokenAt - task.receivedAt) / 1000);
      },
      onOutcome: (outcome) => {
        task.noteStarted(flight.startedAt ?? performance.now());
        // What the joined call cost is known only at its end: the same usage a call of this chat's own would have had.
        if (joined && outcome.kind === 'end' && !outcome.cancelled && outcome.result !== null) {
          metrics.modelTokensSaved.inc({ reason: 'joined' }, outcome.result.usage.promptTokens + outcome.result.usage.completionTokens);
        }
        finishTask(task, outcome, reservation, promptTokens, storedReplyId);
      },
      cancel: () => {
        flight.letGo(listener);
        const lost = lapsed.get(task);
        finishTask(task, lost === undefined ? { kind: 'cancelled' } : { kind: 'error', error: lost }, reservation, promptTokens);
      },
    };
    cancels.set(task, listener.cancel);
    flight.attach(listener);
  }

  function checkConversationOwner(caller: Identity, conversationId: string, owner: string | undefined): void {
    if (owner === undefined) throw new AppError('not_found', `no conversation ${conversationId}`);
    if (owner !== caller.userId) throw new AppError('forbidden', 'this conversation belongs to another user');
  }

  /**
   * The conversation's earlier messages for the model, once its owner is checked. Both reads go out at once (one
   * round trip to a remote store); the context of a conversation that is not the caller's is read and dropped.
   */
  async function earlierMessages(caller: Identity, conversationId: string | undefined, creatable: boolean): Promise<ContextMessage[]> {
    if (conversationId === undefined) return [];
    const wanted = options.contextMessages;
    const [owner, earlier] = await Promise.all([store.conversationOwner(conversationId), wanted === 0 ? [] : store.context(conversationId, wanted)]);
    // A conversation the client names and that does not exist yet is created by the commit (checked again there).
    if (owner === undefined && creatable) return [];
    checkConversationOwner(caller, conversationId, owner);
    return earlier;
  }

  /**
   * A cache hit, a call already in flight to join, or a call of its own with a place in the pool (refused: throws,
   * holding nothing). From the look at `flights` to the new flight's set there is no await: identical sends share
   * one call however their steps interleave, and a joiner never takes a place in the pool.
   */
  async function planReply(userId: string, key: string | null, mode: CacheMode, request: ModelRequest): Promise<ReplyPlan> {
    const hit = key !== null && mode === 'use' ? await cache.get(key) : undefined;
    if (key !== null && mode !== 'bypass') (hit ? metrics.cacheHits : metrics.cacheMisses).inc();
    if (hit) return { kind: 'cached', chunks: hit.chunks, result: { finishReason: hit.finishReason, usage: hit.usage, usageSource: 'reported' } };
    const inFlight = key !== null && mode === 'use' ? flights.get(key) : undefined;
    if (inFlight?.joinable) {
      inFlight.hold();
      return { kind: 'join', flight: inFlight };
    }
    // Refused (nothing held yet): rate_limited when this user's share of the queue is full, else overloaded.
    const slot = pool.reserve(userId);
    const flight = openFlight(mode === 'bypass' ? null : key);
    if (key !== null && mode === 'use' && (await followsOtherNode(flight, key))) {
      // Another node runs the identical call: this one streams from its log, and needs no place in the pool.
      slot.release();
      return { kind: 'join', flight };
    }
    return { kind: 'run', flight, slot, request, writeCache: mode !== 'bypass' };
  }

  /**
   * Cluster mode's single-flight across nodes, for a flight just opened here (local identical sends join it
   * meanwhile): true when another node holds the call of this key, and the flight now streams from that node's
   * flight log; false when this node claimed it (and publishes its chunks) or there is nothing to share.
   */
  async function followsOtherNode(flight: Flight, key: string): Promise<boolean> {
    const shared = options.sharedFlights;
    const log = options.taskLog;
    if (shared === undefined || log === undefined) return false;
    const id = `flight_${randomBase64url(16)}`;
    const claimKey = `flight:${key}`;
    const claim = await shared.claims.claim(claimKey, id, shared.claimMs).catch(() => ({ won: true as const }));
    if (claim.won) {
      publishFlight(log, flight, id, () => void shared.claims.release(claimKey, id).catch(() => {}));
      return false;
    }
    // The holder opens its flight log right after its claim: give it a moment to appear before following it.
    for (let tries = 0; tries < LOG_OPEN_TRIES; tries++) {
      if ((await log.meta(claim.holder)) !== undefined) {
        followFlight(log, flight, claim.holder);
        return true;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    // Never appeared (its node failed before its call started): this node calls the model itself.
    publishFlight(log, flight, id, () => {});
    return false;
  }

  /**
   * Publishes a flight's chunks and outcome to a log of its own, for the nodes that follow it; `done` at its end.
   * The log's lease is the flight's: when this node dies, its followers end node_lost.
   */
  function publishFlight(log: TaskLog, flight: Flight, id: string, done: () => void): void {
    const writer = log.open({ taskId: id, userId: '', conversationId: '', createdAt: Date.now() }, { onCancel: () => {}, onLapsed: () => {} });
    let seq = 0;
    // Readers on other nodes are not holders here: a published call runs to its end (its reply is cached too),
    // however many of this node's chats let go of it.
    flight.hold();
    flight.attach({
      onStart: () => writer.markRunning(),
      onChunk: (text) => writer.append(seq++, text),
      onOutcome: (outcome) => {
        writer.end(flightTerminal(id, outcome));
        done();
      },
    });
  }

  /** Feeds a flight from another node's flight log: its chunks, then its outcome (node_lost when that node died). */
  function followFlight(log: TaskLog, flight: Flight, id: string): void {
    const stop = log.follow(id, 0, {
      delta: (_seq, text) => {
        flight.started();
        flight.chunk(text);
      },
      end: (terminal) => {
        flight.started();
        flight.settle(outcomeOf(terminal));
      },
      gone: () => flight.settle({ kind: 'error', error: new AppError('node_lost', 'the node running the shared model call is gone') }),
    });
    flight.setCancel(stop);
  }

  /**
   * Gives back what a refused send's plan holds. A call of its own that others joined while this send waited on
   * its limits is started for them all the same (on this send's place in the pool); one nobody joined is dropped.
   */
  function releasePlan(plan: ReplyPlan): void {
    if (plan.kind === 'cached') return;
    plan.flight.letGo();
    if (plan.kind !== 'run') return;
    if (plan.flight.joinable) {
      startCall(plan);
      return;
    }
    plan.slot.release();
    plan.flight.settle({ kind: 'end', result: null, cancelled: true });
  }

  /** Model tokens (not for a hit), then one chat from the user's bucket, in one step; a refusal gives back what the plan holds. */
  async function takeLimits(
    userId: string,
    plan: ReplyPlan,
    request: ModelRequest,
  ): Promise<{ reservation: TokenReservation | null; chat: Extract<LimitDecision, { ok: true }> }> {
    const maxTokens = plan.kind === 'cached' ? null : (request.maxTokens ?? options.defaultMaxTokens);
    const admitted = await limits.admit(userId, maxTokens).catch((err: unknown) => {
      releasePlan(plan);
      throw err;
    });
    if (!admitted.ok) {
      releasePlan(plan);
      const what = admitted.bucket === 'tokens' ? 'model token budget used up' : 'too many chats';
      throw new AppError('rate_limited', `${what}; retry in ${admitted.retryAfterMs} ms`, { retryAfterMs: admitted.retryAfterMs });
    }
    return { reservation: admitted.reservation, chat: { ok: true, info: admitted.info } };
  }

  /** Every check of a send, in order, up to the commit; a refusal throws having given back what it took. */
  async function prepareSend(caller: Identity, body: Omit<ChatSendBody, 'id'>, sendOptions: SendOptions): Promise<PreparedSend> {
    const turn = sendOptions.regenerate ? await lastUserTurn(caller, body.conversationId) : undefined;
    // The caller's own context (the OpenAI route) replaces the stored one; the conversation, when named, must
    // still be the caller's.
    const stored = turn === undefined ? await earlierMessages(caller, body.conversationId, sendOptions.createConversation === true) : undefined;
    const earlier = turn?.context ?? sendOptions.context ?? stored ?? [];
    const text = turn?.text ?? body.text;
    const request = buildRequest({ ...body, text }, earlier);
    // A regenerated reply is a new one: never the cached or in-flight answer to the same question (refresh replaces it).
    const mode = sendOptions.regenerate ? 'refresh' : (body.cache ?? 'use');
    const key = cache.keyOf(request);
    // Decide how the reply will be produced before anything is stored, so refusals store nothing.
    const plan = await planReply(caller.userId, key, mode, request);
    const { reservation, chat } = await takeLimits(caller.userId, plan, request);
    if (closing) {
      releasePlan(plan);
      reservation?.release();
      throw shuttingDown();
    }
    if (plan.kind === 'run') startCall(plan);
    // Counted once the call is on its way: only the commit and the reply's end need it.
    const promptTokens = request.messages.reduce((n, m) => n + countTokens(m.content), 0);
    // Held until the task attaches after its commit (or lets go if the commit fails).
    return { plan, flight: plan.kind === 'cached' ? null : plan.flight, reservation, chat, promptTokens, text, replyTo: turn?.messageId };
  }

  /** Stores the question (and a hit's reply, in the same commit); on failure `undo` lets go of what the send holds. */
  async function commitChat(chat: Omit<BeginChat, 'knownReply'>, plan: ReplyPlan, undo: () => void): Promise<BeganChat> {
    const knownReply =
      plan.kind === 'cached'
        ? {
            text: plan.chunks.join(''),
            finishReason: plan.result.finishReason,
            promptTokens: plan.result.usage.promptTokens,
            completionTokens: plan.result.usage.completionTokens,
          }
        : undefined;
    try {
      return await store.beginChat({ ...chat, knownReply });
    } catch (err) {
      undo();
      // The store's own refusal (a conversation another user made meanwhile, a key another send holds) is the client's answer.
      if (isAppError(err) || err instanceof IdempotencyKeyTaken) throw err;
      log.error({ err, userId: chat.userId }, 'storing a chat failed');
      // Full, read-only or failing storage is a state the server recovers from: retryable, and nothing was stored.
      const storage = describeStorageError(err);
      if (storage !== undefined) throw new AppError('overloaded', `storage unavailable: ${storage}; the message was not stored, retry later`);
      throw new AppError('internal', 'the message could not be stored; it was not sent');
    }
  }

  /** After the commit: a hit replays its stored chunks, a run or a join streams from its flight, a send during shutdown is cancelled. */
  function startReply(
    task: Task,
    plan: ReplyPlan,
    flight: Flight | null,
    reservation: TokenReservation | null,
    promptTokens: number,
    replyMessageId: string | undefined,
  ): void {
    if (closing && plan.kind !== 'cached') {
      flight?.letGo();
      finishTask(task, { kind: 'cancelled' }, reservation, promptTokens);
    } else if (plan.kind === 'cached') {
      // A hit replays the stored chunks with their boundaries, as the miss streamed them.
      const replay = new Flight(null, () => {});
      replay.hold();
      replay.started();
      for (const chunk of plan.chunks) replay.chunk(chunk);
      replay.settle({ kind: 'end', result: plan.result, cancelled: false });
      metrics.modelCallsSaved.inc({ reason: 'cache' });
      metrics.modelTokensSaved.inc({ reason: 'cache' }, plan.result.usage.promptTokens + plan.result.usage.completionTokens);
      listen(task, replay, null, promptTokens, replyMessageId);
    } else if (flight !== null) {
      if (plan.kind === 'join') {
        metrics.singleflightJoins.inc();
        metrics.modelCallsSaved.inc({ reason: 'joined' });
      }
      listen(task, flight, reservation, promptTokens, undefined, plan.kind === 'join');
    }
  }

  /** A send counted in flight: checked, committed and acknowledged; a refusal gives back its place in the count. */
  /**
   * Cluster mode: the task's log, which readers on other nodes follow, holding this node's lease on it. A cancel
   * from another node cancels it here; a lease this node lost (Redis gone for longer than it) ends it as the other
   * nodes saw it end: node_lost.
   */
  function publish(task: Task): void {
    const log = options.taskLog;
    if (log === undefined) return;
    const writer: TaskLogWriter = log.open(
      { taskId: task.taskId, userId: task.userId, conversationId: task.conversationId, createdAt: task.createdAt },
      {
        onCancel: () => {
          if (!task.ending) cancels.get(task)?.();
        },
        onLapsed: (terminal) => {
          const lost = new AppError('node_lost', terminal.message);
          const cancel = cancels.get(task);
          cancels.delete(task);
          if (cancel !== undefined && !task.ending) lapsed.set(task, lost);
          cancel?.();
        },
      },
    );
    task.publishTo(writer);
  }

  async function sendCounted(
    caller: Identity,
    body: Omit<ChatSendBody, 'id'>,
    receivedAt: number,
    sendOptions: SendOptions,
    keyed: KeyedRequest | undefined,
  ): Promise<FreshSend> {
    const userId = caller.userId;
    let prepared: PreparedSend;
    try {
      prepared = await prepareSend(caller, body, sendOptions);
    } catch (err) {
      releaseInFlight(userId);
      throw err;
    }
    const { plan, flight, reservation, chat, promptTokens, text, replyTo } = prepared;
    const taskId = newTaskId();
    const status = plan.kind === 'cached' ? 'cached' : 'queued';
    const source: ReplySource = plan.kind === 'cached' ? 'cache' : plan.kind === 'join' ? 'joined' : 'model';
    const idempotency = keyed === undefined ? undefined : idempotencyRecord(keyed, { status, rateLimit: chat.info }, source);
    const toStore = { taskId, userId, conversationId: body.conversationId, text, createConversation: sendOptions.createConversation, replyTo, idempotency };
    const began = await commitChat(toStore, plan, () => {
      releaseInFlight(userId);
      reservation?.release();
      flight?.letGo();
    });
    const task = new Task(taskId, userId, began.conversationId, receivedAt, began.createdAt, plan.kind === 'cached', pumps);
    tasks.set(taskId, task);
    // Not awaited: the ack does not wait for Redis. A reader on another node that comes before the log is open
    // waits for it (see followRemote).
    publish(task);
    latestByConversation.set(began.conversationId, task);
    running.add(task);
    startReply(task, plan, flight, reservation, promptTokens, began.replyMessageId);
    metrics.ackLatency.observe((performance.now() - receivedAt) / 1000);
    if (options.bus !== undefined) {
      const createdAt = new Date(began.createdAt).toISOString();
      const started = { type: 'chat.started' as const, taskId, conversationId: began.conversationId, messageId: began.messageId, text, createdAt };
      announceStarted(options.bus, userId, started, sendOptions.origin).catch((err: unknown) => log.warn({ err, taskId }, 'announcing chat.started failed'));
    }
    return {
      duplicate: false,
      task,
      source,
      subscribe: (sink) => task.subscribe(sink, 0, countDelta),
      ack: { taskId, conversationId: began.conversationId, messageId: began.messageId, status, rateLimit: chat.info },
    };
  }

  const cancels = new WeakMap<Task, () => void>();
  // Tasks whose lease lapsed (see publish): their cancel ends them node_lost instead of cancelled.
  const lapsed = new WeakMap<Task, AppError>();

  /** A send with nothing to repeat: the running cap, then checked, committed and acknowledged. */
  function sendFresh(
    caller: Identity,
    body: Omit<ChatSendBody, 'id'>,
    receivedAt: number,
    sendOptions: SendOptions,
    keyed: KeyedRequest | undefined,
  ): Promise<FreshSend> {
    if (closing) return Promise.reject(shuttingDown());
    try {
      checkRunningCap(caller.userId);
    } catch (err) {
      return Promise.reject(err);
    }
    // Counted before the first await, in the tick of the check above: sends racing in one tick cannot pass the cap together.
    chatsInFlight.set(caller.userId, (chatsInFlight.get(caller.userId) ?? 0) + 1);
    const sending = sendCounted(caller, body, receivedAt, sendOptions, keyed);
    pendingSends.add(sending);
    const settled = () => pendingSends.delete(sending);
    sending.then(settled, settled);
    return sending;
  }

  return {
    send(caller, body, receivedAt = performance.now(), sendOptions = {}) {
      if (closing) return Promise.reject(shuttingDown());
      const key = body.clientMessageId;
      if (key === undefined) return sendFresh(caller, body, receivedAt, sendOptions, undefined);
      // A repeated key gets the first send's ack, before any limit is taken (src/chat/idempotency.ts).
      const keyed = keyedRequest(key, body.text, body.conversationId, sendOptions.regenerate === true);
      return idempotent
        .send(caller.userId, keyed, () => sendFresh(caller, body, receivedAt, sendOptions, keyed))
        .then((sent): SendResult => ('task' in sent ? sent : { ...sent, duplicate: true }));
    },

    async cancel(caller, taskId) {
      const task = await visibleTask(caller, taskId);
      if (task.ending || task.terminal !== null) return;
      if (remote.get(taskId) === task) {
        // Another node runs it: the cancel goes to that node, and its end reaches the readers here through the log.
        if (!(await options.taskLog?.requestCancel(taskId))) throw new AppError('not_found', `task ${taskId} runs on a node this one cannot reach now`);
        return;
      }
      cancels.get(task)?.();
    },

    async subscribe(caller, taskId, fromSeq, sink) {
      const task = await visibleTask(caller, taskId);
      return task.subscribe(sink, fromSeq, countDelta);
    },

    async task(caller, taskId) {
      const found = await ownTask(caller, taskId);
      if (found instanceof Task) return found.info();
      const snapshot = unfinished(found) ? await options.taskLog?.snapshot(taskId) : undefined;
      if (snapshot !== undefined) {
        const { conversationId, status, seq, text, createdAt } = snapshot;
        return { taskId, conversationId, status, seq, text, createdAt: new Date(createdAt).toISOString() };
      }
      const stored = found;
      return {
        taskId: stored.taskId,
        conversationId: stored.conversationId,
        status: stored.status,
        // Past its retention window (or stored without its chunk boundaries) a task reports its stored text as one delta.
        seq: stored.text.length > 0 ? 1 : 0,
        text: stored.text,
        createdAt: new Date(stored.createdAt).toISOString(),
      };
    },

    async history(caller, conversationId, before, limit) {
      // Both reads at once (one round trip to a remote store); the owner is checked first, then the page's own refusal.
      const [owner, page] = await Promise.all([
        store.conversationOwner(conversationId),
        store.history(conversationId, before, limit).then(
          (ok) => ({ ok }),
          (err: unknown) => ({ err }),
        ),
      ]);
      checkConversationOwner(caller, conversationId, owner);
      if ('err' in page) throw page.err;
      return page.ok;
    },

    conversations: (caller, query) => conversationsPage(store, caller, query),

    async streamingTask(caller, conversationId) {
      const owner = await store.conversationOwner(conversationId);
      if (owner === undefined) return null;
      if (owner !== caller.userId) throw new AppError('forbidden', 'this conversation belongs to another user');
      const task = latestByConversation.get(conversationId);
      return task !== undefined && task.terminal === null ? task.taskId : null;
    },

    async close() {
      closing = true;
      for (const task of [...running]) {
        try {
          cancels.get(task)?.();
        } catch (err) {
          log.warn({ err: toAppError(err).message, taskId: task.taskId }, 'cancelling a task at shutdown failed');
        }
      }
      // A send still being checked is refused (see prepareSend); one whose commit is in this flush is acknowledged,
      // then ended `cancelled`, in continuations that run after it: keep flushing and waiting until no send, no write
      // and no ending is left, or its ack would go out with no end.
      do {
        store.flush();
        await Promise.allSettled([...pendingSends, ...pendingFinishes]);
        await new Promise<void>((resolve) => setImmediate(resolve));
      } while (pendingSends.size > 0 || pendingFinishes.size > 0 || store.pendingWrites > 0);
      retention.close();
    },
  };
}
