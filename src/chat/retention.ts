import type { ChatStore, StoredTask } from '../db/chat-store.js';
import { errorCatalogue, type ErrorCode } from '../protocol/index.js';
import { Task, type TaskTerminal } from './task.js';

/**
 * Bytes one finished task costs in memory besides its text and chunk boundaries: the Task, its ids, its
 * chat.done, its empty subscriber set, its registry entry. Measured on Node 20 (x64) by `npm run bench:task-bytes`
 * (1,111 to 1,164 bytes with 0 or 1 delta); see docs/retention.md.
 */
export const TASK_OVERHEAD_BYTES = 1152;
/** A finished task keeps each delta as one uint32 offset into its text. */
const BYTES_PER_DELTA = 4;
// biome-ignore lint/suspicious/noControlCharactersInRegex: the Latin-1 range starts at U+0000, control characters included
const LATIN1_ONLY = /^[\u0000-\u00ff]*$/;

/** What a finished task costs in memory: V8 keeps a string of Latin-1 characters at a byte each, else two. */
export function retainedBytes(task: Task): number {
  const perChar = LATIN1_ONLY.test(task.text) ? 1 : 2;
  return TASK_OVERHEAD_BYTES + task.text.length * perChar + task.deltaCount * BYTES_PER_DELTA;
}

export interface RetentionOptions {
  store: ChatStore;
  /** Bytes of finished tasks kept in memory (see retainedBytes); past it the oldest are dropped from memory. */
  maxBytes: number;
  /** How long a finished task stays resumable, from memory or else from storage. */
  retentionMs: number;
  /** The task leaves memory: drop it from the registry (it stays resumable from storage within the window). */
  forget(task: Task): void;
  onBytes?(bytes: number): void;
}

export interface RetentionStats {
  retainedTasks: number;
  retainedBytes: number;
  /** Tasks dropped from memory by the byte budget before their window ended. */
  evictedTasks: number;
}

export interface Retention {
  /** Keeps a task whose end is stored, oldest dropped first past the budget; call once, after its end is written. */
  keepEnded(task: Task): void;
  /**
   * A task not in memory, from storage: a Task that replays as it streamed (shared while anyone streams it), the
   * stored row when it cannot be replayed (no recorded boundaries, unfinished, or past the window), or undefined.
   */
  restore(taskId: string): Promise<Task | StoredTask | undefined>;
  stats(): RetentionStats;
  close(): void;
}

function terminalOf(stored: StoredTask): TaskTerminal | undefined {
  const replay = stored.replay;
  if (replay === undefined) return undefined;
  const taskId = stored.taskId;
  if (stored.status === 'error') {
    const code = (replay.errorCode ?? 'internal') as ErrorCode;
    const known = Object.hasOwn(errorCatalogue, code) ? code : 'internal';
    return { type: 'chat.error', taskId, code: known, message: replay.errorMessage ?? '', retryable: errorCatalogue[known].retryable };
  }
  if ((stored.status !== 'done' && stored.status !== 'cancelled') || replay.replyMessageId === null) return undefined;
  return {
    type: 'chat.done',
    taskId,
    messageId: replay.replyMessageId,
    finishReason: replay.finishReason ?? 'stop',
    usage: { promptTokens: replay.promptTokens, completionTokens: replay.completionTokens },
    cached: replay.cached,
    timings: replay.timings,
  };
}

/**
 * The finished tasks kept in memory for resume and task.get: in the order they ended, dropped when their
 * retention window ends or, oldest first, when their bytes pass the budget. A dropped task is rebuilt from
 * its stored reply and chunk boundaries on demand, so the budget bounds memory, not resumability.
 */
export function createRetention(options: RetentionOptions): Retention {
  const { store, maxBytes, retentionMs, forget } = options;
  // A queue with a moving head: dropping the oldest is O(1); the array is compacted now and then.
  let queue: Task[] = [];
  let sizes: number[] = [];
  let head = 0;
  let bytes = 0;
  let evicted = 0;
  // Tasks rebuilt from storage while someone still streams them: many resumes of one task share one copy.
  const restored = new Map<string, WeakRef<Task>>();
  const collected = new FinalizationRegistry<string>((taskId) => {
    if (restored.get(taskId)?.deref() === undefined) restored.delete(taskId);
  });

  const dropOldest = () => {
    const task = queue[head] as Task;
    bytes -= sizes[head] as number;
    queue[head] = undefined as unknown as Task;
    head++;
    forget(task);
    if (head > 1024 && head * 2 > queue.length) {
      queue = queue.slice(head);
      sizes = sizes.slice(head);
      head = 0;
    }
  };
  const report = () => options.onBytes?.(bytes);

  const sweep = setInterval(
    () => {
      const cutoff = Date.now() - retentionMs;
      const before = head;
      while (head < queue.length && ((queue[head] as Task).endedAt ?? 0) <= cutoff) dropOldest();
      if (head !== before) report();
    },
    Math.min(30_000, retentionMs),
  );
  sweep.unref();

  return {
    keepEnded(task) {
      const size = retainedBytes(task);
      queue.push(task);
      sizes.push(size);
      bytes += size;
      while (bytes > maxBytes && head < queue.length) {
        dropOldest();
        evicted++;
      }
      report();
    },

    async restore(taskId) {
      const shared = restored.get(taskId)?.deref();
      if (shared !== undefined) return shared;
      const stored = await store.task(taskId);
      if (stored === undefined) return undefined;
      const replay = stored.replay;
      const terminal = terminalOf(stored);
      const ends = replay?.deltaEnds;
      // The boundaries must cover the stored text exactly, or the replay would not be the stream that went out.
      const covers = ends !== undefined && (ends.length === 0 ? stored.text === '' : ends[ends.length - 1] === stored.text.length);
      if (replay === undefined || terminal === undefined || !covers || replay.finishedAt + retentionMs < Date.now()) return stored;
      // Another resume may have rebuilt it while this one read the row: keep the one copy.
      const sharedMeanwhile = restored.get(taskId)?.deref();
      if (sharedMeanwhile !== undefined) return sharedMeanwhile;
      const status = stored.status as 'done' | 'error' | 'cancelled';
      const ids = {
        taskId,
        userId: stored.userId,
        conversationId: stored.conversationId,
        createdAt: stored.createdAt,
        endedAt: replay.finishedAt,
        cached: replay.cached,
      };
      const task = Task.restored(ids, stored.text, replay.deltaEnds, terminal, status);
      restored.set(taskId, new WeakRef(task));
      collected.register(task, taskId);
      return task;
    },

    stats() {
      return { retainedTasks: queue.length - head, retainedBytes: bytes, evictedTasks: evicted };
    },

    close() {
      clearInterval(sweep);
    },
  };
}
