/**
 * The task log in process: the embedded server's, and the reference the Redis
 * log is tested against. Several logs (nodes) may share one set of records and
 * one bus, as the nodes of a cluster share Redis: leases, sweeping, node_lost
 * and cancels then behave as across processes.
 */
import { createLocalBus, type NodeBus } from './bus.js';
import {
  followTracked,
  nodeChannel,
  nodeLost,
  type Notice,
  statusOf,
  type TaskLog,
  type TaskLogInfo,
  type TaskLogMeta,
  type TaskLogOptions,
  type TaskLogTerminal,
  type TaskLogWriter,
  type TaskLogWriterHandlers,
  taskChannel,
  taskLogTimings,
} from './task-log.js';

interface MemoryTask {
  info: TaskLogInfo;
  deltas: string[];
  terminal: TaskLogTerminal | null;
  /** Date.now() until which its node's lease holds. */
  leaseUntil: number;
  cancelRequested: boolean;
  /** Date.now() after which it is gone; Infinity while it runs. */
  expiresAt: number;
}

/** What the nodes of one process share: the task records and the bus their notices go over. */
export class MemoryTaskRecords {
  readonly bus: NodeBus = createLocalBus();
  private readonly tasks = new Map<string, MemoryTask>();
  readonly running = new Set<MemoryTask>();
  // Ended tasks in the order they ended, for dropping them when their window ends.
  private ended: MemoryTask[] = [];
  private endedHead = 0;

  get(taskId: string): MemoryTask | undefined {
    const task = this.tasks.get(taskId);
    if (task === undefined || task.expiresAt > Date.now()) return task;
    this.tasks.delete(taskId);
    return undefined;
  }

  add(task: MemoryTask): void {
    if (this.get(task.info.taskId) !== undefined) throw new Error(`task log: ${task.info.taskId} is open already`);
    this.tasks.set(task.info.taskId, task);
    this.running.add(task);
  }

  /** Writes the terminal message once: false when the task had ended already. */
  end(task: MemoryTask, terminal: TaskLogTerminal, retentionMs: number): boolean {
    if (task.terminal !== null) return false;
    task.terminal = terminal;
    task.info.status = statusOf(terminal);
    task.expiresAt = Date.now() + retentionMs;
    this.running.delete(task);
    this.ended.push(task);
    const notice: Notice = { s: task.deltas.length, t: [], e: terminal };
    void this.bus.publish(taskChannel(task.info.taskId), JSON.stringify(notice));
    return true;
  }

  /** Drops the ended tasks whose window is over. */
  prune(): void {
    const now = Date.now();
    while (this.endedHead < this.ended.length && (this.ended[this.endedHead] as MemoryTask).expiresAt <= now) {
      const task = this.ended[this.endedHead] as MemoryTask;
      if (this.tasks.get(task.info.taskId) === task) this.tasks.delete(task.info.taskId);
      this.endedHead++;
    }
    if (this.endedHead > 1024 && this.endedHead * 2 > this.ended.length) {
      this.ended = this.ended.slice(this.endedHead);
      this.endedHead = 0;
    }
  }
}

export interface MemoryTaskLogOptions extends TaskLogOptions {
  /** Shared with the other logs (nodes) of this process; default: records of its own. */
  records?: MemoryTaskRecords;
}

export function createMemoryTaskLog(options: MemoryTaskLogOptions): TaskLog {
  const timings = taskLogTimings(options);
  const { nodeId, log } = options;
  const records = options.records ?? new MemoryTaskRecords();
  const bus = records.bus;
  const writers = new Map<string, MemoryWriter>();
  const followers = new Set<() => void>();
  let closed = false;

  class MemoryWriter implements TaskLogWriter {
    readonly opened = Promise.resolve(true);
    private done = false;
    private cancelled = false;

    constructor(
      readonly record: MemoryTask,
      private readonly handlers: TaskLogWriterHandlers,
    ) {}

    get taskId(): string {
      return this.record.info.taskId;
    }

    /** False when nothing more may be written: ended, lapsed, or the node closed. */
    private writable(): boolean {
      if (this.done || closed) return false;
      if (this.record.terminal === null) return true;
      this.lapse(this.record.terminal);
      return false;
    }

    markRunning(): void {
      if (this.writable() && this.record.info.status === 'queued') this.record.info.status = 'running';
    }

    append(seq: number, text: string): void {
      if (!this.writable()) return;
      const deltas = this.record.deltas;
      if (seq !== deltas.length) throw new RangeError(`task log: ${this.taskId} expects seq ${deltas.length}, got ${seq}`);
      deltas.push(text);
      this.record.info.status = 'running';
      const notice: Notice = { s: seq, t: [text] };
      void bus.publish(taskChannel(this.taskId), JSON.stringify(notice));
    }

    end(terminal: TaskLogTerminal): void {
      if (!this.writable()) return;
      this.finish();
      records.end(this.record, terminal, timings.retentionMs);
    }

    renew(now: number): void {
      if (!this.writable()) return;
      this.record.leaseUntil = now + timings.leaseMs;
      if (this.record.cancelRequested) this.cancel();
    }

    cancel(): void {
      if (this.cancelled || !this.writable()) return;
      this.cancelled = true;
      try {
        this.handlers.onCancel();
      } catch (err) {
        log?.warn({ err, taskId: this.taskId }, 'cancelling a task failed');
      }
    }

    private lapse(terminal: TaskLogTerminal): void {
      this.finish();
      if (terminal.type !== 'chat.error') return;
      try {
        this.handlers.onLapsed(terminal);
      } catch (err) {
        log?.warn({ err, taskId: this.taskId }, 'ending a lapsed task failed');
      }
    }

    private finish(): void {
      this.done = true;
      if (writers.get(this.taskId) === this) writers.delete(this.taskId);
    }
  }

  const renew = () => {
    const now = Date.now();
    for (const writer of [...writers.values()]) writer.renew(now);
  };
  const sweep = () => {
    records.prune();
    const now = Date.now();
    for (const task of [...records.running]) {
      // This node is alive: its own leases are renewed by its own timer, late or not.
      if (task.info.nodeId === nodeId || task.leaseUntil > now) continue;
      const terminal = nodeLost(task.info.taskId);
      if (!records.end(task, terminal, timings.retentionMs)) continue;
      try {
        options.onLost?.(task.info.taskId, terminal);
      } catch (err) {
        log?.warn({ err, taskId: task.info.taskId }, 'handling a lost task failed');
      }
    }
  };
  const renewTimer = setInterval(renew, timings.renewEveryMs);
  const sweepTimer = setInterval(sweep, timings.sweepEveryMs);
  renewTimer.unref();
  sweepTimer.unref();
  const offCancels = bus.subscribe(nodeChannel(nodeId), (taskId) => writers.get(taskId)?.cancel());

  const source = {
    bus,
    read: async (taskId: string, fromSeq: number) => {
      const task = records.get(taskId);
      if (task === undefined) return undefined;
      return { deltas: task.deltas.slice(fromSeq), terminal: task.terminal, more: false };
    },
    retryLater: () => Promise.resolve(),
  };

  return {
    nodeId,

    open(meta: TaskLogMeta, handlers) {
      if (closed) throw new Error('task log: closed');
      const record: MemoryTask = {
        info: { ...meta, nodeId, status: 'queued' },
        deltas: [],
        terminal: null,
        leaseUntil: Date.now() + timings.leaseMs,
        cancelRequested: false,
        expiresAt: Number.POSITIVE_INFINITY,
      };
      records.add(record);
      const writer = new MemoryWriter(record, handlers);
      writers.set(meta.taskId, writer);
      return writer;
    },

    async meta(taskId) {
      const task = records.get(taskId);
      return task === undefined ? undefined : { ...task.info };
    },

    async snapshot(taskId) {
      const task = records.get(taskId);
      if (task === undefined) return undefined;
      return { ...task.info, seq: task.deltas.length, text: task.deltas.join(''), terminal: task.terminal };
    },

    follow(taskId, fromSeq, handlers) {
      if (closed) throw new Error('task log: closed');
      return followTracked(followers, source, taskId, fromSeq, handlers);
    },

    async requestCancel(taskId) {
      const local = writers.get(taskId);
      if (local !== undefined) {
        local.cancel();
        return true;
      }
      const task = records.get(taskId);
      if (task === undefined || task.terminal !== null) return false;
      task.cancelRequested = true;
      return bus.publish(nodeChannel(task.info.nodeId), taskId);
    },

    flush: () => Promise.resolve(true),

    async close() {
      if (closed) return;
      closed = true;
      clearInterval(renewTimer);
      clearInterval(sweepTimer);
      offCancels();
      for (const stop of [...followers]) stop();
      followers.clear();
      writers.clear();
    },
  };
}
