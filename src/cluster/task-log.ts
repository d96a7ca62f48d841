/**
 * The task log: what readers on any node see of a task that runs on one node.
 *
 * The node running a task (the writer) opens its log with the task's ids,
 * appends each sealed delta under its seq, and writes the terminal message
 * (chat.done or chat.error) last, once. Readers anywhere ask for its metadata
 * (`meta`, for not_found / forbidden), its text so far (`snapshot`, for
 * task.get) or follow it from a seq (`follow`, for chat.resume and the SSE
 * stream): exactly once per delta, in order, then the terminal message.
 *
 * While a task runs its node holds a lease on it, renewed by one timer per
 * node. A node that stops renewing (it died, or lost Redis for longer than the
 * lease) has its tasks ended by the sweepers of the other nodes with chat.error
 * `node_lost`, written into the log once; `onLost` fires for it on the one node
 * that wrote it. A cancel from any node reaches the node running the task.
 *
 * Two implementations with one contract (test/unit/cluster-task-log.test.ts):
 * in process (memory-task-log.ts: one node, or several sharing one process in
 * tests) and Redis streams (redis-task-log.ts).
 */
import type { Logger } from 'pino';
import type { ChatDone, ChatError, TaskStatus } from '../protocol/index.js';
import type { NodeBus } from './bus.js';

export type TaskLogTerminal = ChatDone | ChatError;

/** What the writer knows of a task when it opens its log. */
export interface TaskLogMeta {
  taskId: string;
  userId: string;
  conversationId: string;
  /** Date.now() of the task's creation, as stored with it. */
  createdAt: number;
}

/** A task as a reader on any node sees it. */
export interface TaskLogInfo extends TaskLogMeta {
  /** The node running (or that ran) the task. */
  nodeId: string;
  /** queued until its model call starts, then running; done, cancelled or error from its terminal message. */
  status: TaskStatus;
}

/** For task.get: the text so far and how many deltas it is. */
export interface TaskLogSnapshot extends TaskLogInfo {
  /** Deltas written so far: resuming from this seq misses nothing. */
  seq: number;
  text: string;
  terminal: TaskLogTerminal | null;
}

export interface TaskLogWriterHandlers {
  /** A reader on some node asked to cancel the task (chat.cancel). Called at most once. */
  onCancel(): void;
  /**
   * The log was ended without this node: its lease lapsed (Redis unreachable for longer than the lease) and
   * another node wrote `terminal` (node_lost). Readers elsewhere have seen it: stop the model call, end the
   * task locally with the same message. Nothing more this writer is given is written.
   */
  onLapsed(terminal: ChatError): void;
}

/** The writing side of one task's log, on the node running the task. */
export interface TaskLogWriter {
  readonly taskId: string;
  /**
   * True once readers on every node can see the log; false when the store cannot be reached now (the writer
   * keeps trying in the background). Never rejects: the chat's ack need not wait for Redis.
   */
  readonly opened: Promise<boolean>;
  /** The model call started: readers see status running before the first delta. */
  markRunning(): void;
  /** Appends a sealed delta (it never changes after this). `seq` is the next one: 0, 1, 2, … with no gap. */
  append(seq: number, text: string): void;
  /** Writes the terminal message after every delta appended so far; once (a second call is ignored). */
  end(terminal: TaskLogTerminal): void;
}

export interface FollowHandlers {
  delta(seq: number, text: string): void;
  /** The terminal message, once, after the last delta; nothing follows it. */
  end(terminal: TaskLogTerminal): void;
  /** There is no log (never was one, or its retention window ended): nothing follows. */
  gone?(): void;
}

export interface TaskLog {
  readonly nodeId: string;
  /** Starts the log of a task that runs on this node and holds its lease until it ends. */
  open(meta: TaskLogMeta, handlers: TaskLogWriterHandlers): TaskLogWriter;
  /** The task's owner, conversation, creation time and status; undefined when this node cannot see it (not_found). */
  meta(taskId: string): Promise<TaskLogInfo | undefined>;
  /** meta and the text so far; undefined when this node cannot see it. */
  snapshot(taskId: string): Promise<TaskLogSnapshot | undefined>;
  /**
   * Delivers the deltas from `fromSeq` on, each once and in order, live as they are appended, then the terminal
   * message; returns the function that stops it. Call it for a task that `meta` found.
   */
  follow(taskId: string, fromSeq: number, handlers: FollowHandlers): () => void;
  /** Asks the node running the task to cancel it; false when no running task of that id could be reached. */
  requestCancel(taskId: string): Promise<boolean>;
  /** Resolves once what was handed to the writers so far has been tried; true when all of it is written. */
  flush(): Promise<boolean>;
  /**
   * Writes what it can, stops following, renewing and sweeping. A writer still open is left to its lease, as
   * when the node dies: end the tasks first (the chat service's close does).
   */
  close(): Promise<void>;
}

/** The timings of leases and retention, the same for every implementation. */
export interface TaskLogOptions {
  nodeId: string;
  /** How long an ended task's log stays readable (resume, task.get). */
  retentionMs: number;
  /** A node that has not renewed a task's lease for this long is taken for dead; default 5000 ms. */
  leaseMs?: number;
  /** How often a node renews all its leases (at most half the lease: two tries before it lapses); default 1500 ms. */
  renewEveryMs?: number;
  /** How often a node looks for lapsed leases; default 2000 ms. */
  sweepEveryMs?: number;
  /** How long a running task's log outlives its node's last renewal when no sweeper ends it; default 1 hour. */
  runningExpiryMs?: number;
  /** A task whose node was lost was ended by this node: called once across the cluster (mark it failed in storage). */
  onLost?(taskId: string, terminal: ChatError): void;
  log?: Pick<Logger, 'warn'>;
}

export interface TaskLogTimings {
  retentionMs: number;
  leaseMs: number;
  renewEveryMs: number;
  sweepEveryMs: number;
  runningExpiryMs: number;
}

/** PROTOCOL.md: readers of a task whose node died get node_lost within this. */
export const NODE_LOST_WITHIN_MS = 15_000;

/** The options' timings with their defaults, checked: a lease renewed too rarely, or lost too late, is refused. */
export function taskLogTimings(options: TaskLogOptions): TaskLogTimings {
  const t = {
    retentionMs: options.retentionMs,
    leaseMs: options.leaseMs ?? 5000,
    renewEveryMs: options.renewEveryMs ?? 1500,
    sweepEveryMs: options.sweepEveryMs ?? 2000,
    runningExpiryMs: options.runningExpiryMs ?? 3_600_000,
  };
  for (const [name, value] of Object.entries(t)) {
    if (!(Number.isInteger(value) && value > 0)) throw new RangeError(`task log: ${name} must be a positive integer of ms, got ${value}`);
  }
  if (t.renewEveryMs * 2 > t.leaseMs) {
    throw new RangeError(`task log: renewEveryMs (${t.renewEveryMs}) must be at most half of leaseMs (${t.leaseMs}), or a slow node could lose its tasks`);
  }
  if (t.leaseMs + t.sweepEveryMs >= NODE_LOST_WITHIN_MS) {
    throw new RangeError(`task log: leaseMs + sweepEveryMs must stay under ${NODE_LOST_WITHIN_MS} ms (node_lost is due within it)`);
  }
  if (t.runningExpiryMs < t.leaseMs * 2) throw new RangeError('task log: runningExpiryMs must be at least twice leaseMs');
  return t;
}

/** The status a terminal message gives its task. */
export function statusOf(terminal: TaskLogTerminal): 'done' | 'cancelled' | 'error' {
  if (terminal.type === 'chat.error') return 'error';
  return terminal.finishReason === 'cancelled' ? 'cancelled' : 'done';
}

export function nodeLost(taskId: string): ChatError {
  return {
    type: 'chat.error',
    taskId,
    code: 'node_lost',
    message: 'the node running this task stopped before it ended; send the message again',
    retryable: true,
  };
}

/** The bus channel of a task's notices, and the one of a node (cancels for the tasks it runs). */
export const taskChannel = (taskId: string) => `tasklog:${taskId}`;
export const nodeChannel = (nodeId: string) => `tasklog:node:${nodeId}`;

/**
 * A notice on a task's channel: deltas `t` from seq `s` on, then maybe the terminal message `e`. Notices tell
 * readers what was written; the log is the record, read again whenever a notice is missing.
 */
export interface Notice {
  s: number;
  t: string[];
  e?: TaskLogTerminal;
}

function parseNotice(message: string): Notice | undefined {
  try {
    const n = JSON.parse(message) as Partial<Notice>;
    if (typeof n.s !== 'number' || !Array.isArray(n.t)) return undefined;
    return { s: n.s, t: n.t, e: n.e };
  } catch {
    return undefined;
  }
}

/** Deltas from a seq on, as far as one read goes. */
export interface LogPage {
  deltas: string[];
  /** The terminal message, when the read reached the end of an ended log. */
  terminal: TaskLogTerminal | null;
  /** True when the read stopped at its page size: read again from the next seq. */
  more: boolean;
}

/** What following needs from an implementation: its bus, and reads of the record. */
export interface FollowSource {
  readonly bus: NodeBus;
  /** The deltas from `fromSeq` on; undefined when there is no log; rejects when the record cannot be read now. */
  read(taskId: string, fromSeq: number): Promise<LogPage | undefined>;
  /** Resolves when a read that failed is worth trying again. */
  retryLater(): Promise<void>;
}

/**
 * followLog for a log implementation's follow(): the follower is kept in `followers` (the implementation stops
 * them all when it closes) until it ends, is gone, or its caller stops it.
 */
export function followTracked(
  followers: Set<() => void>,
  source: FollowSource,
  taskId: string,
  fromSeq: number,
  handlers: FollowHandlers,
  log?: Pick<Logger, 'warn'>,
): () => void {
  const stop = followLog(
    source,
    taskId,
    fromSeq,
    {
      delta: (seq, text) => handlers.delta(seq, text),
      end: (terminal) => {
        followers.delete(stop);
        handlers.end(terminal);
      },
      gone: () => {
        followers.delete(stop);
        handlers.gone?.();
      },
    },
    log,
  );
  followers.add(stop);
  return () => {
    followers.delete(stop);
    stop();
  };
}

/**
 * Exact delivery from `fromSeq`: subscribe to the task's notices, wait until the subscription is in effect,
 * read the record from `fromSeq`, then apply notices (queued meanwhile) in order. A notice that skips ahead
 * (one was lost) or a bus resync makes it read the record again from the last seq delivered; what was
 * delivered already is dropped. One Redis subscription per task per node, whatever the number of followers:
 * the bus fans out.
 */
export function followLog(source: FollowSource, taskId: string, fromSeq: number, handlers: FollowHandlers, log?: Pick<Logger, 'warn'>): () => void {
  let next = fromSeq;
  let stopped = false;
  // True while the record is being read (from the start until the first read is done): notices wait in `queued`.
  let reading = true;
  let readAgain = false;
  const queued: Notice[] = [];

  const stop = () => {
    if (stopped) return;
    stopped = true;
    queued.length = 0;
    offNotices();
    offResync();
  };
  // A handler that throws is the caller's failure: it is reported and the follow stops.
  const call = (fn: () => void): boolean => {
    try {
      fn();
    } catch (err) {
      log?.warn({ err, taskId }, 'a task log follower failed; it stopped');
      stop();
    }
    return !stopped;
  };
  const deliver = (seq: number, text: string): boolean => {
    next = seq + 1;
    return call(() => handlers.delta(seq, text));
  };
  const finish = (terminal: TaskLogTerminal) => {
    stop();
    try {
      handlers.end(terminal);
    } catch (err) {
      log?.warn({ err, taskId }, 'a task log follower failed at the end');
    }
  };

  const apply = (notice: Notice) => {
    for (let i = 0; i < notice.t.length; i++) {
      const seq = notice.s + i;
      if (seq < next) continue;
      if (seq > next) {
        catchUp();
        return;
      }
      if (!deliver(seq, notice.t[i] as string)) return;
    }
    if (notice.e === undefined) return;
    if (next >= notice.s + notice.t.length) finish(notice.e);
    else catchUp();
  };

  const readRecord = async () => {
    while (!stopped) {
      readAgain = false;
      let page: LogPage | undefined;
      try {
        page = await source.read(taskId, next);
      } catch {
        await source.retryLater();
        continue;
      }
      if (stopped) return;
      if (page === undefined) {
        stop();
        if (handlers.gone) call(() => handlers.gone?.());
        return;
      }
      for (const text of page.deltas) if (!deliver(next, text)) return;
      if (page.terminal !== null) {
        finish(page.terminal);
        return;
      }
      if (page.more || readAgain) continue;
      reading = false;
      while (!reading && !stopped && queued.length > 0) apply(queued.shift() as Notice);
      return;
    }
  };
  const catchUp = () => {
    if (stopped) return;
    if (reading) {
      readAgain = true;
      return;
    }
    reading = true;
    void readRecord();
  };

  const offNotices = source.bus.subscribe(taskChannel(taskId), (message) => {
    if (stopped) return;
    const notice = parseNotice(message);
    if (notice === undefined) return;
    if (reading) queued.push(notice);
    else apply(notice);
  });
  // After a cut the bus lost what was sent meanwhile: the record has it.
  const offResync = source.bus.onResync(() => catchUp());
  source.bus.subscribed().then(
    () => void readRecord(),
    () => void readRecord(),
  );
  return stop;
}
