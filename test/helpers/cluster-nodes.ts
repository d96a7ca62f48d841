/**
 * chatwire in cluster mode as an operator runs it: N real processes
 * (`node dist/src/main.js`, port 0 of 127.0.0.1) on one PostgreSQL database and
 * one Redis key prefix, each node with a data dir of its own (its first-level
 * reply cache). Nodes can be killed with SIGKILL and started again on their data dir.
 *
 * Around the nodes, what the cluster tests and the cluster load and bench
 * scripts need: a Redis server of their own that they may stop and start again
 * (the shared one is never stopped), a TCP proxy in front of PostgreSQL whose
 * connections can be cut and restored, a scratch database for the scripts,
 * and the check of a chat ledger against PostgreSQL.
 *
 * Nothing here imports node:test, so the scripts can use it; test/helpers/cluster.ts
 * adds the per-test-run database and key prefix, the skip rule and the cleanup.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Redis } from 'ioredis';
import { openPostgres } from '../../src/db/pg.js';
import { conversationCorrupt, type Ledger } from './chat-ledger.js';
import { startProcess, type ServerProcess } from './process.js';

export interface ClusterOptions {
  /** How many nodes; named A, B, C, … in that order. */
  nodes: number;
  /** postgres://… of the cluster's database (it may be empty: the nodes migrate it). */
  databaseUrl: string;
  /** redis://… */
  redisUrl: string;
  /** CHATWIRE_REDIS_PREFIX of every node. */
  redisPrefix: string;
  /** Settings of every node (CHATWIRE_*), next to the cluster's own. */
  env?: Record<string, string>;
}

export interface ClusterNode {
  readonly index: number;
  /** A, B, C, … */
  readonly name: string;
  readonly dataDir: string;
  /** The node's current process (a new one after restart). */
  readonly process: ServerProcess;
  readonly http: string;
  readonly ws: string;
  readonly port: number;
  /** Started and not killed or stopped since. */
  readonly alive: boolean;
}

const NAMES = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ';

/** Every node process this process started: none outlives it, whatever ends it. */
const children = new Set<ChildProcess>();
let exitHook = false;
function track(child: ChildProcess): void {
  children.add(child);
  child.once('exit', () => children.delete(child));
  if (exitHook) return;
  exitHook = true;
  process.once('exit', () => {
    for (const c of children) c.kill('SIGKILL');
  });
}

class Node implements ClusterNode {
  alive = true;
  constructor(
    readonly index: number,
    readonly dataDir: string,
    public process: ServerProcess,
  ) {}
  get name(): string {
    return NAMES[this.index] ?? `N${this.index}`;
  }
  get http(): string {
    return this.process.http;
  }
  get ws(): string {
    return this.process.ws;
  }
  get port(): number {
    return this.process.port;
  }
}

/** N chatwire nodes in cluster mode on one database and one Redis prefix. */
export class Cluster {
  private stopped = false;

  private constructor(
    readonly options: ClusterOptions,
    private readonly root: string,
    private readonly members: Node[],
  ) {}

  /** Starts every node at once (they apply the migrations together, under PostgreSQL's advisory lock). */
  static async start(options: ClusterOptions): Promise<Cluster> {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-cluster-'));
    const dirs = Array.from({ length: options.nodes }, (_, i) => path.join(root, `node-${NAMES[i] ?? i}`));
    const started = await Promise.allSettled(dirs.map((dir) => launch(options, dir)));
    const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed) {
      await Promise.all(started.map((s) => (s.status === 'fulfilled' ? s.value.kill() : undefined)));
      fs.rmSync(root, { recursive: true, force: true });
      throw failed.reason;
    }
    const nodes = started.map((s, i) => new Node(i, dirs[i] as string, (s as PromiseFulfilledResult<ServerProcess>).value));
    return new Cluster(options, root, nodes);
  }

  get nodes(): readonly ClusterNode[] {
    return this.members;
  }

  node(i: number): ClusterNode {
    const n = this.members[i];
    if (!n) throw new Error(`no node ${i} in a cluster of ${this.members.length}`);
    return n;
  }

  /** The nodes running now. */
  live(): ClusterNode[] {
    return this.members.filter((n) => n.alive);
  }

  /** SIGKILL: no shutdown code runs on the node (its leases lapse, its sockets drop). Resolves once it is gone. */
  async kill(i: number): Promise<void> {
    const n = this.members[i] as Node;
    n.alive = false;
    await n.process.kill();
  }

  /** SIGTERM and wait: the node's graceful shutdown. */
  async stopNode(i: number): Promise<void> {
    const n = this.members[i] as Node;
    n.alive = false;
    await n.process.stop();
  }

  /** Starts node i again on its data dir (a new port), after kill or stopNode. */
  async restart(i: number, env: Record<string, string> = {}): Promise<ClusterNode> {
    const n = this.members[i] as Node;
    if (n.alive) throw new Error(`node ${n.name} is running`);
    n.process = await launch({ ...this.options, env: { ...this.options.env, ...env } }, n.dataDir);
    n.alive = true;
    return n;
  }

  /** The sum of a metric (every label set) over the running nodes' /metrics. */
  async metricSum(name: string): Promise<number> {
    const values = await Promise.all(this.live().map(async (n) => metricValue(await (await fetch(`${n.http}/metrics`)).text(), name)));
    return values.reduce((a, b) => a + b, 0);
  }

  /** SIGTERM to every running node (SIGKILL after `graceMs`), then their data dirs are removed. */
  async stop(graceMs = 10_000): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await Promise.all(
      this.members.map(async (n) => {
        if (!n.alive) return;
        n.alive = false;
        const timer = setTimeout(() => void n.process.kill(), graceMs);
        await n.process.stop();
        clearTimeout(timer);
      }),
    );
    fs.rmSync(this.root, { recursive: true, force: true });
  }
}

function launch(options: ClusterOptions, dataDir: string): Promise<ServerProcess> {
  const started = startProcess({
    CHATWIRE_WORKER_THREADS: '1',
    ...options.env,
    CHATWIRE_DATABASE_URL: options.databaseUrl,
    CHATWIRE_REDIS_URL: options.redisUrl,
    CHATWIRE_REDIS_PREFIX: options.redisPrefix,
    CHATWIRE_DATA_DIR: dataDir,
  });
  return started.then((p) => {
    track(p.child);
    return p;
  });
}

/** The sum of a metric's samples over every label set (0 when the page has none). */
export function metricValue(text: string, name: string): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

// ---------- a Redis server of its own ----------

/** A free TCP port on 127.0.0.1 (free when asked: another process may take it before it is used). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/**
 * `redis-server` on a free port of loopback, without persistence, that can be stopped (SIGKILL, as a crash)
 * and started again on the same port: the URL stays the same, the data does not survive.
 */
export class RedisServer {
  private child: ChildProcess | null = null;
  private output = '';

  private constructor(readonly port: number) {}

  static async start(): Promise<RedisServer> {
    const server = new RedisServer(await freePort());
    await server.start();
    return server;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  get running(): boolean {
    return this.child !== null;
  }

  /** Starts it (again) on its port; resolves once it answers PING. */
  async start(): Promise<void> {
    if (this.child) return;
    const child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.output = '';
    child.stdout?.on('data', (c: Buffer) => (this.output += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (this.output += c.toString()));
    const failed = new Promise<never>((_, reject) => {
      child.once('error', (err) => reject(new Error(`redis-server could not be started (is it on PATH?): ${err.message}`)));
      child.once('exit', (code, signal) => reject(new Error(`redis-server exited (${code ?? signal}) on port ${this.port}:\n${this.output.slice(-2000)}`)));
    });
    failed.catch(() => {});
    this.child = child;
    track(child);
    child.once('exit', () => {
      if (this.child === child) this.child = null;
    });
    await Promise.race([failed, this.answers(10_000)]);
  }

  /** SIGKILL: every client connection drops at once, and nothing answers on the port until start(). */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGKILL');
    await exited;
    this.child = null;
  }

  private async answers(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const probe = new Redis(this.url, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null });
      probe.on('error', () => {});
      try {
        await probe.connect();
        await probe.ping();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`redis-server on port ${this.port} does not answer: ${(err as Error).message}`);
      } finally {
        probe.disconnect();
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** Deletes every key under `prefix` on the Redis at `url` (a no-op when it does not answer). */
export async function deleteRedisKeys(url: string, prefix: string): Promise<void> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
  redis.on('error', () => {});
  try {
    await redis.connect();
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 500);
      cursor = next;
      if (keys.length > 0) await redis.unlink(...keys);
    } while (cursor !== '0');
  } catch {
    // Redis gone: nothing to delete.
  } finally {
    redis.disconnect();
  }
}

// ---------- a proxy that can cut the way to PostgreSQL ----------

/**
 * A TCP proxy on a free port of loopback in front of `target`. cut() drops every
 * connection through it and resets new ones until restore(): to the nodes,
 * the server is unreachable, while it keeps running for everyone else.
 */
export class TcpProxy {
  private cutOff = false;
  private readonly pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async start(target: { host: string; port: number }): Promise<TcpProxy> {
    let proxy: TcpProxy | undefined;
    const server = net.createServer((client) => proxy?.accept(client, target));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    proxy = new TcpProxy(server, (server.address() as net.AddressInfo).port);
    return proxy;
  }

  get isCut(): boolean {
    return this.cutOff;
  }

  private accept(client: net.Socket, target: { host: string; port: number }): void {
    client.on('error', () => {});
    if (this.cutOff) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(target.port, target.host);
    upstream.on('error', () => {});
    const pair = { client, upstream };
    this.pairs.add(pair);
    const drop = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.once('close', drop);
    upstream.once('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  }

  /** Resets every connection through the proxy, and every new one until restore(). */
  cut(): void {
    this.cutOff = true;
    for (const { client, upstream } of [...this.pairs]) {
      client.resetAndDestroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  restore(): void {
    this.cutOff = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

// ---------- a scratch database (for the scripts) ----------

/**
 * Creates `chatwire_<label>_<pid>_<random>` on the server of `adminUrl` (a postgres:// URL of a database the
 * user may create databases from) and returns its URL and drop(). Databases of the same label left by
 * processes that are gone are dropped first.
 */
export async function createScratchDatabase(adminUrl: string, label: string): Promise<{ name: string; url: string; drop(): Promise<void> }> {
  const name = `chatwire_${label}_${process.pid}_${crypto.randomBytes(4).toString('hex')}`;
  const sql = openPostgres(adminUrl, { max: 1, applicationName: `chatwire-${label}` });
  try {
    const rows = await sql<{ datname: string }[]>`SELECT datname FROM pg_database WHERE datname LIKE ${`chatwire\\_${label}\\_%`}`;
    for (const { datname } of rows) {
      const pid = Number(new RegExp(`^chatwire_${label}_(\\d+)_`).exec(datname)?.[1]);
      if (!Number.isSafeInteger(pid) || pid === process.pid) continue;
      try {
        process.kill(pid, 0);
      } catch {
        await sql.unsafe(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
      }
    }
    await sql.unsafe(`CREATE DATABASE "${name}"`);
  } finally {
    await sql.end({ timeout: 5 });
  }
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return {
    name,
    url: url.toString(),
    drop: async () => {
      const admin = openPostgres(adminUrl, { max: 1, applicationName: `chatwire-${label}` });
      try {
        await admin.unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
      } finally {
        await admin.end({ timeout: 5 });
      }
    },
  };
}

// ---------- the ledger against PostgreSQL ----------

export interface ClusterVerification {
  acked: number;
  /** Acknowledged user messages not stored, or stored with another text, conversation or task. */
  lostAcked: string[];
  /** Replies announced by chat.done (with a messageId) not stored as that task's reply (with the streamed text, when it was followed whole). */
  replies: number;
  lostReplies: string[];
  /** Acknowledged tasks that got no chat.done or chat.error. */
  unended: string[];
  /** Tasks whose stored status is not what their end said (done / cancelled / error), or that are not stored. */
  statusMismatches: { taskId: string; ended: string; stored: string | null }[];
  /** Conversations whose stored messages are out of ack order, or whose replies do not follow their question. */
  corruptConversations: string[];
  /** Tasks still queued or running in the database. */
  unfinishedTasks: number;
  messages: number;
}

/** What a task's end says its stored status must be. */
export function statusOfEnd(end: { type: string; finishReason?: string | undefined }): 'done' | 'cancelled' | 'error' {
  if (end.type === 'chat.error') return 'error';
  return end.finishReason === 'cancelled' ? 'cancelled' : 'done';
}

/**
 * Checks a ledger against the cluster's PostgreSQL database: every acknowledged message stored with its text,
 * every announced reply stored, every acknowledged task ended exactly once (the ledger counts a second end as a
 * duplicate) with the stored status its end announced, and every conversation in order.
 */
export async function verifyLedgerInPostgres(databaseUrl: string, ledger: Ledger): Promise<ClusterVerification> {
  const sql = openPostgres(databaseUrl, { max: 2, applicationName: 'chatwire-verify' });
  try {
    type MessageRow = { message_id: string; conversation_id: string; role: string; text: string; task_id: string | null };
    const messages = new Map<string, MessageRow>();
    const wanted = [...ledger.acked.values()].map((c) => c.messageId);
    for (const end of ledger.ended.values()) if (end.type === 'chat.done' && end.messageId !== undefined) wanted.push(end.messageId);
    for (let i = 0; i < wanted.length; i += 1000) {
      const rows = await sql<MessageRow[]>`
        SELECT message_id, conversation_id, role, text, task_id FROM messages WHERE message_id = ANY(${wanted.slice(i, i + 1000)})`;
      for (const r of rows) messages.set(r.message_id, r);
    }
    const lostAcked: string[] = [];
    for (const chat of ledger.acked.values()) {
      const row = messages.get(chat.messageId);
      if (!row || row.conversation_id !== chat.conversationId || row.role !== 'user' || row.text !== chat.text || row.task_id !== chat.taskId)
        lostAcked.push(chat.taskId);
    }
    const lostReplies: string[] = [];
    let replies = 0;
    for (const [taskId, end] of ledger.ended) {
      if (end.type !== 'chat.done' || end.messageId === undefined) continue;
      replies++;
      const row = messages.get(end.messageId);
      if (row?.role !== 'assistant' || row.task_id !== taskId || (end.complete && row.text !== end.text)) lostReplies.push(taskId);
    }
    const statuses = new Map<string, string>();
    const taskIds = [...ledger.acked.keys()];
    for (let i = 0; i < taskIds.length; i += 1000) {
      const rows = await sql<{ task_id: string; status: string }[]>`SELECT task_id, status FROM tasks WHERE task_id = ANY(${taskIds.slice(i, i + 1000)})`;
      for (const r of rows) statuses.set(r.task_id, r.status);
    }
    const unended: string[] = [];
    const statusMismatches: ClusterVerification['statusMismatches'] = [];
    for (const taskId of ledger.acked.keys()) {
      const end = ledger.ended.get(taskId);
      if (end === undefined) {
        unended.push(taskId);
        continue;
      }
      const stored = statuses.get(taskId) ?? null;
      if (stored !== statusOfEnd(end))
        statusMismatches.push({ taskId, ended: end.type === 'chat.error' ? `chat.error ${end.code}` : `chat.done ${end.finishReason}`, stored });
    }
    const corruptConversations: string[] = [];
    const conversationIds = [...ledger.conversations.keys()];
    const byConversation = new Map<string, { message_id: string; role: string; task_id: string | null }[]>();
    for (let i = 0; i < conversationIds.length; i += 500) {
      const rows = await sql<{ conversation_id: string; message_id: string; role: string; task_id: string | null }[]>`
        SELECT conversation_id, message_id, role, task_id FROM messages WHERE conversation_id = ANY(${conversationIds.slice(i, i + 500)}) ORDER BY seq`;
      for (const r of rows) {
        const list = byConversation.get(r.conversation_id) ?? [];
        list.push(r);
        byConversation.set(r.conversation_id, list);
      }
    }
    for (const [conversationId, ackedIds] of ledger.conversations) {
      if (conversationCorrupt(ackedIds, byConversation.get(conversationId) ?? [])) corruptConversations.push(conversationId);
    }
    const [unfinished] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE status IN ('queued', 'running')`;
    const [total] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM messages`;
    return {
      acked: ledger.acked.size,
      lostAcked,
      replies,
      lostReplies,
      unended,
      statusMismatches,
      corruptConversations,
      unfinishedTasks: unfinished?.n ?? 0,
      messages: total?.n ?? 0,
    };
  } finally {
    await sql.end({ timeout: 5 });
  }
}
