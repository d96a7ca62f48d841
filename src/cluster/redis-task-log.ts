/**
 * The task log on Redis, for cluster mode.
 *
 * Keys (under the hub's prefix), per task: `tasklog:<taskId>` a stream of its
 * deltas, the deltas of one write in one entry (a JSON array, entry id
 * `<seq of its last delta>-1`), then its terminal message at the highest id
 * there is (nothing can be added after it); `tasklog:<taskId>:meta` a hash
 * (owner, conversation, createdAt, node, status, the terminal message, a
 * cancel request); `tasklog:<taskId>:lease` the running node's lease (PX).
 * One sorted set `tasklog:running` indexes running tasks by lease deadline
 * (Redis time), for the sweepers.
 *
 * Every write is a Lua script, so each is atomic and safe to repeat: an append
 * writes nothing the stream has (a retry after a lost reply is told where the
 * stream ends and sends from there), refuses to leave a gap, and writes nothing
 * after a terminal message;
 * the same script publishes what it wrote on the task's channel, so a notice
 * never comes before the record. A node's appends of one event-loop turn go in
 * one pipeline, and one pipeline is in flight at a time.
 *
 * Redis unreachable: writers keep every delta until their end is written and
 * send what the stream lacks once it is back; leases are renewed at once then.
 * An outage shorter than the lease ends nothing. A longer one lets the leases
 * lapse: nodes that still reach Redis end those tasks with node_lost, and the
 * writer, back, finds that terminal message, writes nothing more and calls
 * onLapsed. When no node reached Redis meanwhile, the first to come back
 * decides: the owner's renewal (sent at once) keeps its task running, a
 * sweeper ends it.
 */
import type { ChainableCommander } from 'ioredis';
import type { ChatError } from '../protocol/index.js';
import type { NodeBus } from './bus.js';
import type { RedisHub } from './redis.js';
import {
  followTracked,
  type LogPage,
  nodeChannel,
  nodeLost,
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

/** The stream id of the terminal message: above every delta's, so nothing is appended after it. */
const TERMINAL_MS = '9007199254740991';
const TERMINAL_ID = `${TERMINAL_MS}-0`;
/** Entries per read of a follower, deltas per append script, tasks per renewal script, lapsed tasks per sweep. */
const READ_PAGE = 1000;
const APPEND_CHUNK = 500;
const RENEW_CHUNK = 200;
const SWEEP_LIMIT = 200;

const NOW_MS = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`;
const NEXT_SEQ = `local nextSeq = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then nextSeq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end`;

const SCRIPTS = {
  // KEYS stream, meta, lease, index. ARGV '1' to open the record first (its first write), userId, conversationId,
  // createdAt, nodeId, leaseMs, then firstSeq, terminal JSON or '', its status, retentionMs, runningExpiryMs, channel,
  // taskId, '1' to mark it running, the deltas from firstSeq on as a JSON array, and their number.
  // Returns {'ok', deltas in the stream}, {'gap', deltas in the stream} (nothing written: send from there),
  // {'ended', terminal} or {'missing'}.
  tasklogAppend: {
    numberOfKeys: 4,
    lua: `local A = 6
if ARGV[1] == '1' then
  local ended = redis.call('HGET', KEYS[2], 'end')
  if ended then return {'ended', ended} end
  redis.call('HSET', KEYS[2], 'u', ARGV[2], 'c', ARGV[3], 't', ARGV[4], 'n', ARGV[5])
  redis.call('HSETNX', KEYS[2], 's', 'queued')
  redis.call('PEXPIRE', KEYS[2], ARGV[A + 5])
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
  ${NOW_MS}
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[A + 7])
elseif redis.call('EXISTS', KEYS[2]) == 0 then return {'missing'}
else
  local ended = redis.call('HGET', KEYS[2], 'end')
  if ended then return {'ended', ended} end
end
${NEXT_SEQ}
local first = tonumber(ARGV[A + 1])
local n = tonumber(ARGV[A + 10])
-- A gap, or deltas the stream has in part (a retry after a lost reply, with more since): the writer sends from nextSeq.
if first > nextSeq or (first < nextSeq and first + n > nextSeq) then return {'gap', nextSeq} end
local wrote = first == nextSeq and n > 0
if wrote then redis.call('XADD', KEYS[1], (first + n - 1) .. '-1', 'j', ARGV[A + 9]) end
if ARGV[A + 2] ~= '' then
  redis.call('XADD', KEYS[1], '${TERMINAL_ID}', 'e', ARGV[A + 2])
  redis.call('HSET', KEYS[2], 'end', ARGV[A + 2], 's', ARGV[A + 3])
  redis.call('PEXPIRE', KEYS[1], ARGV[A + 4])
  redis.call('PEXPIRE', KEYS[2], ARGV[A + 4])
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[A + 7])
else
  -- The status and the stream's expiry are set with the stream's first entry (the lease renewal extends the expiry).
  if (wrote and (nextSeq == 0 or ARGV[1] == '1')) or ARGV[A + 8] == '1' then redis.call('HSET', KEYS[2], 's', 'running') end
  if wrote and nextSeq == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[A + 5]) end
end
if wrote or ARGV[A + 2] ~= '' then
  local notice = '{"s":' .. nextSeq .. ',"t":' .. (wrote and ARGV[A + 9] or '[]')
  if ARGV[A + 2] ~= '' then notice = notice .. ',"e":' .. ARGV[A + 2] end
  redis.call('PUBLISH', ARGV[A + 6], notice .. '}')
end
return {'ok', math.max(nextSeq, first + n)}`,
  },
  // KEYS index, then meta, lease, stream of each task. ARGV leaseMs, runningExpiryMs, nodeId, then the task ids.
  // Returns per task '' (renewed), 'c' (renewed; a cancel was asked), 'm' (no record) or its terminal message.
  tasklogRenew: {
    lua: `${NOW_MS}
local deadline = now + tonumber(ARGV[1])
local out = {}
for i = 4, #ARGV do
  local k = (i - 4) * 3 + 2
  local f = redis.call('HMGET', KEYS[k], 'n', 'end', 'x')
  if not f[1] then out[#out + 1] = 'm'
  elseif f[2] then out[#out + 1] = f[2]
  else
    redis.call('SET', KEYS[k + 1], ARGV[3], 'PX', ARGV[1])
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
    redis.call('PEXPIRE', KEYS[k + 2], ARGV[2])
    out[#out + 1] = f[3] and 'c' or ''
  end
end
return out`,
  },
  // KEYS index. ARGV limit. The running tasks whose lease deadline has passed.
  tasklogCandidates: {
    numberOfKeys: 1,
    lua: `${NOW_MS}
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])`,
  },
  // KEYS meta, lease, stream, index. ARGV taskId, node_lost JSON, retentionMs, channel, this node's id.
  // Returns 1 when it ended the task now, 2 when it dropped a task whose record was gone, else 0.
  tasklogLost: {
    numberOfKeys: 4,
    lua: `if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
local f = redis.call('HMGET', KEYS[1], 'n', 'end')
if not f[1] then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 2
end
if f[1] == ARGV[5] then return 0 end
redis.call('ZREM', KEYS[4], ARGV[1])
if f[2] then return 0 end
local nextSeq = 0
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #last > 0 then nextSeq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
redis.call('XADD', KEYS[3], '${TERMINAL_ID}', 'e', ARGV[2])
redis.call('HSET', KEYS[1], 'end', ARGV[2], 's', 'error')
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], '{"s":' .. nextSeq .. ',"t":[],"e":' .. ARGV[2] .. '}')
return 1`,
  },
  // KEYS meta. ARGV the node channel prefix, taskId. Returns 1 when the running task's node was asked.
  tasklogCancel: {
    numberOfKeys: 1,
    lua: `local f = redis.call('HMGET', KEYS[1], 'n', 'end')
if not f[1] or f[2] then return 0 end
redis.call('HSET', KEYS[1], 'x', '1')
redis.call('PUBLISH', ARGV[1] .. f[1], ARGV[2])
return 1`,
  },
} as const;

type ScriptName = keyof typeof SCRIPTS;
type Args = (string | number)[];
type ScriptCalls<R> = { [K in ScriptName]: (...args: Args) => R };

/** The keys of one task's log, for the tests and for operators. */
export function taskLogKeys(hub: RedisHub, taskId: string): { stream: string; meta: string; lease: string } {
  return { stream: hub.key(`tasklog:${taskId}`), meta: hub.key(`tasklog:${taskId}:meta`), lease: hub.key(`tasklog:${taskId}:lease`) };
}

export interface RedisTaskLogOptions extends TaskLogOptions {
  hub: RedisHub;
  /** The node's bus (one subscription per channel per node). */
  bus: NodeBus;
}

type Entry = [id: string, fields: string[]];

/** Deltas from `fromSeq` on and the terminal message, from stream entries read from the one holding `fromSeq`. */
function pageOf(entries: Entry[], fromSeq: number, pageSize: number): LogPage {
  const deltas: string[] = [];
  let terminal: TaskLogTerminal | null = null;
  for (const [id, fields] of entries) {
    if (id === TERMINAL_ID) {
      terminal = JSON.parse(fields[1] as string) as TaskLogTerminal;
      break;
    }
    // Field `d`: one delta, as entries were written before a write's deltas shared an entry (still read, for the
    // logs such nodes wrote).
    const texts = fields[0] === 'd' ? [fields[1] as string] : (JSON.parse(fields[1] as string) as string[]);
    const last = Number(id.slice(0, id.indexOf('-')));
    const first = last - texts.length + 1;
    const next = fromSeq + deltas.length;
    // The stream has no gap and no overlap (the append script refuses both): an entry out of place means a broken record.
    if (first > next || last < next || (deltas.length > 0 && first !== next)) throw new Error(`task log: entry ${id} out of place`);
    for (let i = next - first; i < texts.length; i++) deltas.push(texts[i] as string);
  }
  return { deltas, terminal, more: terminal === null && entries.length === pageSize };
}

/** The stream id to read from: the entry holding `fromSeq` is the first whose last seq is `fromSeq` or more. `fromSeq` is a client's number, any size. */
const startId = (fromSeq: number) => (fromSeq >= Number(TERMINAL_MS) ? TERMINAL_ID : `${fromSeq}-1`);

function infoOf(taskId: string, fields: Record<string, string>): TaskLogInfo | undefined {
  if (fields.n === undefined) return undefined;
  const ended = fields.end === undefined ? null : (JSON.parse(fields.end) as TaskLogTerminal);
  return {
    taskId,
    userId: fields.u ?? '',
    conversationId: fields.c ?? '',
    createdAt: Number(fields.t),
    nodeId: fields.n,
    status: ended !== null ? statusOf(ended) : fields.s === 'running' ? 'running' : 'queued',
  };
}

export function createRedisTaskLog(options: RedisTaskLogOptions): TaskLog {
  const timings = taskLogTimings(options);
  const { hub, bus, nodeId, log } = options;
  const command = hub.command;
  for (const [name, script] of Object.entries(SCRIPTS)) command.defineCommand(name, script);
  const scripts = command as unknown as ScriptCalls<Promise<unknown>>;
  const index = hub.key('tasklog:running');
  const nodeChannelPrefix = hub.key(nodeChannel(''));
  const writers = new Map<string, RedisWriter>();
  const followers = new Set<() => void>();
  let closed = false;

  // --- Writing: the writers with something to send, one pipeline in flight, retried with backoff while Redis is away.
  const dirty = new Set<RedisWriter>();
  let inFlight: Promise<void> | null = null;
  let scheduled: (() => void) | null = null;
  let failures = 0;
  // Set once close() has written what it could: nothing is sent after.
  let stopped = false;

  const schedule = () => {
    if (stopped || inFlight !== null || scheduled !== null || dirty.size === 0) return;
    if (failures === 0) {
      const immediate = setImmediate(runFlush);
      scheduled = () => clearImmediate(immediate);
    } else {
      const timer = setTimeout(runFlush, Math.min(100 * 2 ** Math.min(failures, 5), 2000));
      scheduled = () => clearTimeout(timer);
    }
  };
  const markDirty = (writer: RedisWriter) => {
    dirty.add(writer);
    schedule();
  };
  function runFlush(): void {
    scheduled = null;
    inFlight = flushOnce()
      .catch((err: unknown) => {
        failures++;
        log?.warn({ err }, 'writing task logs to Redis failed');
      })
      .finally(() => {
        inFlight = null;
        schedule();
      });
  }
  async function flushOnce(): Promise<void> {
    const batch = [...dirty];
    dirty.clear();
    const pipeline = command.pipeline();
    const replies: Reply[] = [];
    const sentAt = Date.now();
    for (const writer of batch) writer.queue(pipeline, replies, sentAt);
    if (replies.length === 0) return;
    let results: [Error | null, unknown][] | null = null;
    try {
      results = await pipeline.exec();
    } catch {
      // Not sent (Redis unreachable): every writer of the batch is tried again.
    }
    let failed = false;
    replies.forEach((reply, i) => {
      const result = results?.[i];
      const err = result === undefined ? new Error('no reply') : result[0];
      if (err !== null) failed = true;
      reply(err, result?.[1]);
    });
    failures = failed ? failures + 1 : 0;
  }
  /** Sends what waits now, and again what the answers ask for (a gap to fill, a record to write again), while Redis answers. */
  async function flushNow(): Promise<void> {
    if (inFlight !== null) await inFlight;
    for (let round = 0; round < 4 && dirty.size > 0 && !stopped && (round === 0 || failures === 0); round++) {
      if (scheduled !== null) {
        scheduled();
        scheduled = null;
      }
      if (inFlight === null) runFlush();
      await inFlight;
    }
  }

  type Reply = (err: Error | null, result: unknown) => void;

  class RedisWriter implements TaskLogWriter {
    readonly opened: Promise<boolean>;
    private settleOpened!: (ok: boolean) => void;
    readonly keys: { stream: string; meta: string; lease: string };
    private readonly channel: string;
    /** Every delta until the end is written: what Redis lacks after an outage or a lost record is sent again. */
    private texts: string[] = [];
    /** Deltas the stream is known to hold. */
    private written = 0;
    private runningPending = false;
    private endJson: string | null = null;
    private endStatus = '';
    private endedAt = 0;
    /** The record exists in Redis (the script that opened it answered). */
    isOpen = false;
    /** Nothing left to do: its end is written, it lapsed, or it was given up. */
    done = false;
    private cancelled = false;
    /** Date.now() when the last lease write that succeeded was sent. */
    leaseAt = 0;

    constructor(
      readonly meta: TaskLogMeta,
      private readonly handlers: TaskLogWriterHandlers,
    ) {
      this.keys = taskLogKeys(hub, meta.taskId);
      this.channel = hub.key(taskChannel(meta.taskId));
      this.opened = new Promise((resolve) => {
        this.settleOpened = resolve;
      });
    }

    get taskId(): string {
      return this.meta.taskId;
    }

    private takes(): boolean {
      return !this.done && !closed && this.endJson === null;
    }

    markRunning(): void {
      if (!this.takes()) return;
      this.runningPending = true;
      markDirty(this);
    }

    append(seq: number, text: string): void {
      if (!this.takes()) return;
      if (seq !== this.texts.length) throw new RangeError(`task log: ${this.taskId} expects seq ${this.texts.length}, got ${seq}`);
      this.texts.push(text);
      markDirty(this);
    }

    end(terminal: TaskLogTerminal): void {
      if (!this.takes()) return;
      this.endJson = JSON.stringify(terminal);
      this.endStatus = statusOf(terminal);
      this.endedAt = Date.now();
      markDirty(this);
    }

    /** Adds what Redis lacks of this log to `pipeline`, and how to take each reply to `replies`. */
    queue(pipeline: ChainableCommander, replies: Reply[], sentAt: number): void {
      if (this.done) return;
      if (this.endJson !== null && sentAt - this.endedAt > timings.runningExpiryMs) {
        log?.warn({ taskId: this.taskId }, 'the end of a task could not be written to Redis in time; given up');
        this.finish();
        return;
      }
      const calls = pipeline as unknown as ScriptCalls<ChainableCommander>;
      const k = this.keys;
      const m = this.meta;
      // The record is opened by the first script that writes it (not yet open: it was never written, or lost).
      let opening = !this.isOpen;
      let from = this.written;
      do {
        const to = Math.min(this.texts.length, from + APPEND_CHUNK);
        const end = to === this.texts.length && this.endJson !== null ? this.endJson : '';
        if (!opening && from === to && end === '' && !this.runningPending) break;
        calls.tasklogAppend(
          k.stream,
          k.meta,
          k.lease,
          index,
          opening ? '1' : '',
          m.userId,
          m.conversationId,
          m.createdAt,
          nodeId,
          timings.leaseMs,
          from,
          end,
          end === '' ? '' : this.endStatus,
          timings.retentionMs,
          timings.runningExpiryMs,
          this.channel,
          this.taskId,
          this.runningPending ? '1' : '',
          JSON.stringify(this.texts.slice(from, to)),
          to - from,
        );
        const opened = opening;
        replies.push((err, result) => {
          if (opened) this.onOpen(err, result, sentAt);
          this.onAppend(err, result, end !== '', sentAt);
        });
        opening = false;
        from = to;
      } while (from < this.texts.length);
    }

    /** The answer of the script that opened the record (the same answer then goes to onAppend). */
    private onOpen(err: Error | null, result: unknown, sentAt: number): void {
      if (this.done) return;
      if (err !== null) {
        this.settleOpened(false);
      } else if ((result as [string])[0] !== 'ended') {
        this.isOpen = true;
        this.leaseAt = sentAt;
        this.settleOpened(true);
      }
    }

    private onAppend(err: Error | null, result: unknown, withEnd: boolean, sentAt: number): void {
      if (this.done) return;
      if (err !== null) {
        markDirty(this);
        return;
      }
      const [code, value] = result as [string, string | number | undefined];
      if (code === 'ok') {
        this.written = Math.max(this.written, Number(value));
        this.runningPending = false;
        if (withEnd) this.finish();
      } else if (code === 'gap') {
        // The stream lost entries it had (Redis restarted without them): send them again.
        this.written = Number(value);
        markDirty(this);
      } else if (code === 'ended') {
        this.ended(String(value));
      } else {
        this.missing(sentAt);
      }
    }

    /** The renewal's answer for this task. */
    onRenewed(result: string, sentAt: number): void {
      if (this.done) return;
      if (result === '' || result === 'c') {
        this.leaseAt = sentAt;
        if (result === 'c') this.cancel();
      } else if (result === 'm') {
        this.missing(sentAt);
      } else {
        this.ended(result);
      }
    }

    cancel(): void {
      if (this.cancelled || this.done || closed) return;
      this.cancelled = true;
      try {
        this.handlers.onCancel();
      } catch (err) {
        log?.warn({ err, taskId: this.taskId }, 'cancelling a task failed');
      }
    }

    /** The log has a terminal message: this writer's own (a reply was lost), or node_lost from another node. */
    private ended(terminalJson: string): void {
      this.finish();
      if (terminalJson === this.endJson) return;
      const terminal = JSON.parse(terminalJson) as TaskLogTerminal;
      if (terminal.type === 'chat.error') this.lapsed(terminal);
    }

    /**
     * No record in Redis. Within the lease nobody can have ended and dropped it: Redis lost it, and it is
     * written again. Past the lease it may have been ended as node_lost and expired since: it counts as lapsed.
     */
    private missing(sentAt: number): void {
      // Its open failed in the same pipeline: it is tried again first.
      if (!this.isOpen) {
        markDirty(this);
        return;
      }
      if (sentAt - this.leaseAt <= timings.leaseMs) {
        this.isOpen = false;
        this.written = 0;
        markDirty(this);
        return;
      }
      this.finish();
      this.lapsed(nodeLost(this.taskId));
    }

    private lapsed(terminal: ChatError): void {
      try {
        this.handlers.onLapsed(terminal);
      } catch (err) {
        log?.warn({ err, taskId: this.taskId }, 'ending a lapsed task failed');
      }
    }

    private finish(): void {
      this.done = true;
      this.texts = [];
      this.settleOpened(this.isOpen);
      dirty.delete(this);
      if (writers.get(this.taskId) === this) writers.delete(this.taskId);
    }
  }

  // --- Leases: one timer renews every lease of this node in one pipeline.
  let renewing = false;
  async function renewAll(): Promise<void> {
    const list = [...writers.values()].filter((w) => w.isOpen && !w.done);
    if (renewing || list.length === 0) return;
    renewing = true;
    try {
      const pipeline = command.pipeline();
      const calls = pipeline as unknown as ScriptCalls<ChainableCommander>;
      const chunks: RedisWriter[][] = [];
      for (let i = 0; i < list.length; i += RENEW_CHUNK) chunks.push(list.slice(i, i + RENEW_CHUNK));
      for (const chunk of chunks) {
        const keys = [index, ...chunk.flatMap((w) => [w.keys.meta, w.keys.lease, w.keys.stream])];
        calls.tasklogRenew(keys.length, ...keys, timings.leaseMs, timings.runningExpiryMs, nodeId, ...chunk.map((w) => w.taskId));
      }
      const sentAt = Date.now();
      const results = await pipeline.exec().catch(() => null);
      for (const [i, chunk] of chunks.entries()) {
        const [err, answers] = results?.[i] ?? [new Error('no reply'), null];
        if (err !== null) continue;
        for (const [j, writer] of chunk.entries()) writer.onRenewed(String((answers as unknown[])[j]), sentAt);
      }
    } finally {
      renewing = false;
    }
  }

  // --- Sweeping: every node ends the lapsed tasks of other nodes; the script decides which node does, once.
  let sweeping = false;
  async function sweepOnce(): Promise<void> {
    if (sweeping || !hub.up) return;
    sweeping = true;
    try {
      const ids = (await scripts.tasklogCandidates(index, SWEEP_LIMIT)) as string[];
      if (ids.length === 0) return;
      const pipeline = command.pipeline();
      const calls = pipeline as unknown as ScriptCalls<ChainableCommander>;
      const terminals = ids.map((taskId) => nodeLost(taskId));
      ids.forEach((taskId, i) => {
        const k = taskLogKeys(hub, taskId);
        const json = JSON.stringify(terminals[i]);
        calls.tasklogLost(k.meta, k.lease, k.stream, index, taskId, json, timings.retentionMs, hub.key(taskChannel(taskId)), nodeId);
      });
      const results = (await pipeline.exec()) ?? [];
      results.forEach(([err, ended], i) => {
        if (err !== null || (ended !== 1 && ended !== 2)) return;
        try {
          options.onLost?.(ids[i] as string, terminals[i] as ChatError);
        } catch (e) {
          log?.warn({ err: e, taskId: ids[i] }, 'handling a lost task failed');
        }
      });
    } catch {
      // Redis unreachable: the next sweep looks again.
    } finally {
      sweeping = false;
    }
  }

  const renewTimer = setInterval(() => void renewAll(), timings.renewEveryMs);
  const sweepTimer = setInterval(() => void sweepOnce(), timings.sweepEveryMs);
  renewTimer.unref();
  sweepTimer.unref();
  // Back from an outage: leases first (before any sweeper), then what waited to be written.
  const offState = hub.onState((state) => {
    if (state !== 'up') return;
    void renewAll();
    if (scheduled !== null) {
      scheduled();
      scheduled = null;
    }
    failures = 0;
    schedule();
  });
  const offCancels = bus.subscribe(nodeChannel(nodeId), (taskId) => writers.get(taskId)?.cancel());

  // --- Reading.
  const retryLater = () =>
    new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        off();
        resolve();
      };
      const timer = setTimeout(done, hub.up ? 250 : 2000);
      const off = hub.onState((state) => {
        if (state === 'up') done();
      });
    });
  const source = {
    bus,
    retryLater,
    async read(taskId: string, fromSeq: number): Promise<LogPage | undefined> {
      const k = taskLogKeys(hub, taskId);
      const results = await command.pipeline().exists(k.meta).xrange(k.stream, startId(fromSeq), '+', 'COUNT', READ_PAGE).exec();
      const [existsErr, exists] = results?.[0] ?? [new Error('no reply')];
      const [rangeErr, entries] = results?.[1] ?? [new Error('no reply')];
      if (existsErr || rangeErr) throw existsErr ?? rangeErr;
      const list = entries as Entry[];
      if (list.length === 0 && exists === 0) return undefined;
      return pageOf(list, fromSeq, READ_PAGE);
    },
  };

  return {
    nodeId,

    open(meta, handlers) {
      if (closed) throw new Error('task log: closed');
      if (writers.has(meta.taskId)) throw new Error(`task log: ${meta.taskId} is open already`);
      const writer = new RedisWriter(meta, handlers);
      writers.set(meta.taskId, writer);
      markDirty(writer);
      return writer;
    },

    async meta(taskId) {
      try {
        return infoOf(taskId, await command.hgetall(taskLogKeys(hub, taskId).meta));
      } catch {
        return undefined;
      }
    },

    async snapshot(taskId) {
      const k = taskLogKeys(hub, taskId);
      try {
        const results = await command.pipeline().hgetall(k.meta).xrange(k.stream, '-', '+').exec();
        const [metaErr, fields] = results?.[0] ?? [new Error('no reply')];
        const [rangeErr, entries] = results?.[1] ?? [new Error('no reply')];
        if (metaErr || rangeErr) return undefined;
        const info = infoOf(taskId, fields as Record<string, string>);
        if (info === undefined) return undefined;
        const page = pageOf(entries as Entry[], 0, Number.POSITIVE_INFINITY);
        return { ...info, seq: page.deltas.length, text: page.deltas.join(''), terminal: page.terminal };
      } catch {
        return undefined;
      }
    },

    follow(taskId, fromSeq, handlers) {
      if (closed) throw new Error('task log: closed');
      return followTracked(followers, source, taskId, fromSeq, handlers, log);
    },

    async requestCancel(taskId) {
      const local = writers.get(taskId);
      if (local !== undefined) {
        local.cancel();
        return true;
      }
      try {
        return (await scripts.tasklogCancel(taskLogKeys(hub, taskId).meta, nodeChannelPrefix, taskId)) === 1;
      } catch {
        return false;
      }
    },

    async flush() {
      await flushNow();
      return dirty.size === 0 && [...writers.values()].every((w) => w.isOpen);
    },

    async close() {
      if (closed) return;
      closed = true;
      clearInterval(renewTimer);
      clearInterval(sweepTimer);
      offState();
      offCancels();
      for (const stop of [...followers]) stop();
      followers.clear();
      await flushNow();
      stopped = true;
      if (scheduled !== null) scheduled();
      scheduled = null;
      dirty.clear();
      writers.clear();
    },
  };
}
