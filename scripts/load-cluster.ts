/**
 * npm run load -- --nodes 3 [--kill-node-every 20] [--clients 60] [--chats-per-second 30] [--duration 60]
 *                 [--cache-hits 0.1] [--continue 0.3] [--cancel 0.05] [--min-tokens 8] [--max-tokens 48]
 *                 [--token-delay-ms 15] [--workers 1] [--max-in-flight 4] [--settle-seconds 60] [--seed 1]
 *                 [--database-url postgres://postgres@127.0.0.1:5432/postgres] [--redis-url redis://127.0.0.1:6379]
 *
 * The cluster load run (scripts/load.ts hands over to it when --nodes is given). It creates a scratch
 * PostgreSQL database on the server of --database-url and a Redis key prefix of its own, starts --nodes
 * chatwire nodes in cluster mode on them, and spreads --clients users over the nodes, each on chatwire's
 * client library (src/client) behind a small balancer: a client's socket goes to its node while that
 * node runs, else to a surviving one. The clients send --chats-per-second chats in all (open loop; each
 * with a clientMessageId), a mix of new and continued conversations, repeated questions (cache hits and
 * single-flight across nodes) and cancels.
 *
 * Every --kill-node-every seconds one node (in turn) is killed with SIGKILL and started again on its data
 * dir. Its clients reconnect to a surviving node and resume their replies (chat.resume, by the library);
 * a reply whose node died ends `node_lost` and is asked again as a new chat; a send whose socket died
 * before its ack is sent again with the same clientMessageId (the server answers it once).
 *
 * At the end the nodes are stopped and the run checks in PostgreSQL that no acknowledged message was lost,
 * that every acknowledged task ended exactly once (one chat.done or chat.error, no second one) and that
 * its stored status is the one its end announced. It prints a table and one JSON line, drops the database
 * and deletes its keys, and exits 1 on any loss or mismatch.
 */
import crypto from 'node:crypto';
import WebSocket from 'ws';
import { type ChatStream, ChatwireError, type ChatwireClient, connect, type SendOptions, type WebSocketConstructor } from '../src/client/client.js';
import { createRandom } from '../src/db/marketplace-seed.js';
import { type AckedChat, Ledger, WireStreams } from '../test/helpers/chat-ledger.js';
import { Cluster, createScratchDatabase, deleteRedisKeys, verifyLedgerInPostgres, type ClusterVerification } from '../test/helpers/cluster-nodes.js';
import { parseArgs, printTable, sleep, summarize, UNLIMITED_ENV } from './bench-support.js';
import { openLoop, roundRobin, Samples } from './load-support.js';

export async function runClusterLoad(): Promise<number> {
  const args = parseArgs({
    nodes: '3',
    'kill-node-every': '20',
    clients: '60',
    'chats-per-second': '30',
    duration: '60',
    'cache-hits': '0.1',
    continue: '0.3',
    cancel: '0.05',
    'min-tokens': '8',
    'max-tokens': '48',
    'token-delay-ms': '15',
    workers: '1',
    'max-in-flight': '4',
    'settle-seconds': '60',
    seed: '1',
    'database-url': process.env.CHATWIRE_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres',
    'redis-url': process.env.CHATWIRE_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379',
  });
  const num = (name: string, min: number, max: number): number => {
    const v = Number(args[name]);
    if (!Number.isFinite(v) || v < min || v > max) {
      console.error(`--${name} must be a number in [${min}, ${max}], got ${args[name]}`);
      process.exit(2);
    }
    return v;
  };
  const NODES = Math.floor(num('nodes', 1, 16));
  const KILL_EVERY = num('kill-node-every', 0, 3600);
  const CLIENTS = Math.floor(num('clients', 1, 10_000));
  const CHATS_PER_SECOND = num('chats-per-second', 0, 10_000);
  const DURATION = num('duration', 1, 3600);
  const CACHE_HITS = num('cache-hits', 0, 1);
  const CONTINUE = num('continue', 0, 1);
  const CANCEL = num('cancel', 0, 1);
  const MIN_TOKENS = Math.floor(num('min-tokens', 1, 4096));
  const MAX_TOKENS = Math.floor(num('max-tokens', MIN_TOKENS, 4096));
  const MAX_IN_FLIGHT = Math.floor(num('max-in-flight', 1, 1000));
  const SETTLE_SECONDS = num('settle-seconds', 0, 600);
  if (KILL_EVERY > 0 && NODES < 2) {
    console.error('--kill-node-every needs --nodes 2 or more: the clients of a killed node need a surviving one');
    return 2;
  }
  const random = createRandom(Math.floor(num('seed', 0, 2 ** 31))).next;
  const log = (line: string) => process.stderr.write(`${line}\n`);

  // ---------- the cluster ----------
  const database = await createScratchDatabase(args['database-url'] as string, 'load');
  const redisUrl = args['redis-url'] as string;
  const redisPrefix = `chatwire-load:${process.pid}:${crypto.randomBytes(4).toString('hex')}:`;
  log(`load: ${NODES} cluster nodes on database ${database.name} and Redis ${redisUrl} (prefix ${redisPrefix})`);
  let cluster: Cluster;
  try {
    cluster = await Cluster.start({
      nodes: NODES,
      databaseUrl: database.url,
      redisUrl,
      redisPrefix,
      env: {
        ...UNLIMITED_ENV,
        CHATWIRE_WORKER_THREADS: String(Math.floor(num('workers', 1, 64))),
        CHATWIRE_DEV_TOKEN_DELAY_MS: String(Math.floor(num('token-delay-ms', 0, 10_000))),
      },
    });
  } catch (err) {
    await database.drop();
    await deleteRedisKeys(redisUrl, redisPrefix);
    throw err;
  }
  log(`load: nodes ${cluster.nodes.map((n) => `${n.name} ${n.http}`).join(', ')}`);

  // ---------- clients ----------
  const ledger = new Ledger();
  const ack = new Samples();
  const ttft = new Samples();
  const errors: Record<string, number> = {};
  const counts = {
    sent: 0,
    acked: 0,
    cachedAcks: 0,
    duplicateAcks: 0,
    ended: 0,
    cancelsSent: 0,
    cancelled: 0,
    nodeLost: 0,
    retriedAfterNodeLost: 0,
    resentAfterConnectionLost: 0,
    reconnects: 0,
    resumedStreams: 0,
    movedToAnotherNode: 0,
    unanswered: 0,
  };
  const nodeLostAfterKillMs: number[] = [];
  let lastKillAt = 0;
  const countError = (code: string) => {
    errors[code] = (errors[code] ?? 0) + 1;
  };
  let idempotentSends = false;
  /** Clients per node, for the balancer's choice of a new node. */
  const homes = new Array<number>(NODES).fill(0);

  class ClusterClient {
    readonly user: string;
    home: number;
    client!: ChatwireClient;
    socket: WebSocket | null = null;
    readonly wire: WireStreams;
    inFlight = 0;
    n = 0;
    readonly conversations: string[] = [];

    constructor(readonly index: number) {
      this.user = `cluster-load-${index}`;
      this.home = index % NODES;
      homes[this.home] = (homes[this.home] ?? 0) + 1;
      this.wire = new WireStreams(ledger);
    }

    /** The balancer: the client's node while it runs, else the running node with the fewest clients. */
    route(url: string): string {
      if (!cluster.node(this.home).alive) {
        const live = cluster.live();
        if (live.length > 0) {
          const next = live.reduce((best, n) => ((homes[n.index] ?? 0) < (homes[best.index] ?? 0) ? n : best));
          homes[this.home] = (homes[this.home] ?? 1) - 1;
          homes[next.index] = (homes[next.index] ?? 0) + 1;
          this.home = next.index;
          counts.movedToAnotherNode++;
        }
      }
      const u = new URL(url);
      u.host = `127.0.0.1:${cluster.node(this.home).port}`;
      return u.toString();
    }

    async open(): Promise<void> {
      const self = this;
      class BalancedWebSocket extends WebSocket {
        constructor(url: string, protocols?: string | string[]) {
          super(self.route(url), protocols, { perMessageDeflate: false });
          self.socket = this;
        }
      }
      this.client = connect('ws://cluster/ws', {
        user: this.user,
        WebSocket: BalancedWebSocket as unknown as WebSocketConstructor,
        reconnect: { initialDelayMs: 50, maxDelayMs: 1000 },
        heartbeatMs: 0,
        requestTimeoutMs: 600_000,
      });
      this.client.on('message', (f) => this.wire.frame(f as Parameters<WireStreams['frame']>[0]));
      this.client.on('state', (s) => {
        if (s.state === 'reconnecting' && s.attempt === 1) counts.reconnects++;
      });
      this.client.on('resumed', (streams) => (counts.resumedStreams += streams.length));
      await this.client.ready();
    }

    get ready(): boolean {
      return this.client.state === 'open';
    }

    /** A new chat (a plan of the load), or the retry of one that ended node_lost. */
    chat(plan: { text: string; cache: 'use' | 'bypass'; maxTokens: number; conversationId?: string | undefined; cancel: boolean }): void {
      const options: SendOptions = { cache: plan.cache, params: { maxTokens: plan.maxTokens } };
      if (idempotentSends) Object.assign(options, { clientMessageId: `${this.user}.${this.n}` });
      this.n++;
      if (plan.conversationId !== undefined) options.conversationId = plan.conversationId;
      this.inFlight++;
      counts.sent++;
      void this.send(plan, options, performance.now()).finally(() => this.inFlight--);
    }

    private async send(
      plan: { text: string; cache: 'use' | 'bypass'; maxTokens: number; conversationId?: string | undefined; cancel: boolean },
      options: SendOptions,
      sentAt: number,
    ): Promise<void> {
      let stream: ChatStream;
      for (let attempt = 1; ; attempt++) {
        try {
          stream = await this.client.chat.send(plan.text, options);
          break;
        } catch (err) {
          const code = err instanceof ChatwireError ? err.code : 'internal';
          // The socket died with the send written and unanswered: it may be stored. The same clientMessageId again is safe
          // (without one, its outcome stays unknown: it was not acknowledged).
          if (code === 'connection_lost' && idempotentSends && attempt < 20) {
            counts.resentAfterConnectionLost++;
            continue;
          }
          if (code === 'connection_lost' || code === 'closed') {
            // Not acknowledged: its outcome is unknown to the client, and nothing was promised.
            counts.unanswered++;
            return;
          }
          countError(code);
          ledger.refuse(code);
          return;
        }
      }
      const at = performance.now();
      const { taskId, conversationId, messageId } = stream;
      if ((stream.ack as { duplicate?: boolean }).duplicate) {
        counts.duplicateAcks++;
        // A duplicate does not subscribe its connection: follow the task from its start.
        if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: 'chat.resume', taskId, fromSeq: 0 }));
      }
      if (!ledger.acked.has(taskId)) {
        counts.acked++;
        if (stream.ack.status === 'cached') counts.cachedAcks++;
        ack.add(at - sentAt, at);
        const chat: AckedChat = { taskId, conversationId, messageId, text: plan.text };
        ledger.ack(chat);
      }
      if (!this.conversations.includes(conversationId)) {
        this.conversations.push(conversationId);
        if (this.conversations.length > 8) this.conversations.shift();
      }
      let first = true;
      const off = stream.on('delta', () => {
        if (!first) return;
        first = false;
        off();
        const t = performance.now();
        ttft.add(t - sentAt, t);
      });
      if (plan.cancel) {
        counts.cancelsSent++;
        stream.cancel().catch(() => {});
      }
      await stream.result.catch(() => {});
      off();
      const end = this.wire.takeEnd(taskId);
      if (end === undefined) {
        // The library gave up on the stream without a terminal on the wire (a resume refused, or the client closed).
        if (stream.error) countError(`${stream.error.code} (no terminal)`);
        return;
      }
      ledger.end(taskId, end);
      counts.ended++;
      if (end.type === 'chat.done') {
        if (end.finishReason === 'cancelled') counts.cancelled++;
        return;
      }
      countError(end.code as string);
      if (end.code === 'node_lost') {
        counts.nodeLost++;
        if (lastKillAt > 0) nodeLostAfterKillMs.push(Date.now() - lastKillAt);
        // Retryable: asked again as a new chat, in the same conversation.
        counts.retriedAfterNodeLost++;
        this.chat({ ...plan, conversationId, cancel: false });
      }
    }

    close(): void {
      this.client.close();
    }
  }

  const clients = Array.from({ length: CLIENTS }, (_, i) => new ClusterClient(i));
  for (let i = 0; i < clients.length; i += 50) await Promise.all(clients.slice(i, i + 50).map((c) => c.open()));
  log(`load: ${CLIENTS} clients connected, ${homes.join(' / ')} per node`);
  // Does the server take clientMessageId (idempotent sends)? One probe chat says.
  try {
    const probe = await (clients[0] as ClusterClient).client.chat.send('a probe for idempotent sends', {
      cache: 'bypass',
      params: { maxTokens: 1 },
      clientMessageId: 'cluster-load-probe',
    } as SendOptions);
    await probe.result.catch(() => {});
    idempotentSends = true;
  } catch (err) {
    if (!(err instanceof ChatwireError) || err.code !== 'bad_request') throw err;
  }
  log(
    `load: idempotent sends (clientMessageId) ${idempotentSends ? 'on: a send cut off before its ack is sent again' : 'not supported by the server: a send cut off before its ack is left unanswered'}`,
  );

  // ---------- load, and the kills ----------
  const pick = roundRobin(clients, (c) => c.ready && c.inFlight < MAX_IN_FLIGHT);
  let skipped = 0;
  const issue = () => {
    const c = pick();
    if (!c) {
      skipped++;
      return;
    }
    const maxTokens = MIN_TOKENS + Math.floor(random() * (MAX_TOKENS - MIN_TOKENS + 1));
    const cancel = random() < CANCEL;
    if (random() < CACHE_HITS) {
      c.chat({ text: `cluster popular question number ${Math.floor(random() * 10)}`, cache: 'use', maxTokens: 24, cancel });
      return;
    }
    const conversationId = c.conversations.length > 0 && random() < CONTINUE ? c.conversations[Math.floor(random() * c.conversations.length)] : undefined;
    c.chat({ text: `${c.user} asks about job ${counts.sent} (${random().toString(36).slice(2, 10)})`, cache: 'bypass', maxTokens, conversationId, cancel });
  };
  const started = performance.now();
  const stopLoad = openLoop({ chatsPerSecond: CHATS_PER_SECOND, lookupsPerSecond: 0 }, { chat: issue, lookup: () => {} });

  const kills: { node: string; atS: number; restartMs: number }[] = [];
  let killing: Promise<void> = Promise.resolve();
  let nextVictim = 0;
  const killTimer =
    KILL_EVERY > 0
      ? setInterval(() => {
          // Kills at every, 2·every, … strictly inside the run.
          if (performance.now() - started > DURATION * 1000 - 1000) return;
          killing = killing.then(async () => {
            const i = nextVictim;
            nextVictim = (nextVictim + 1) % NODES;
            const atS = (performance.now() - started) / 1000;
            lastKillAt = Date.now();
            await cluster.kill(i);
            const t0 = performance.now();
            log(`load: t=${atS.toFixed(0)}s node ${cluster.node(i).name} killed (SIGKILL); starting it again`);
            await cluster.restart(i);
            kills.push({ node: cluster.node(i).name, atS: +atS.toFixed(1), restartMs: Math.round(performance.now() - t0) });
            log(`load: node ${cluster.node(i).name} back on ${cluster.node(i).http}`);
          });
        }, KILL_EVERY * 1000)
      : undefined;

  let last = { at: started, sent: 0, acked: 0 };
  const progress = setInterval(() => {
    const now = performance.now();
    const s = (now - last.at) / 1000;
    const a = summarize(ack.between(now - 1000));
    const inFlight = clients.reduce((n, c) => n + c.inFlight, 0);
    log(
      `t=${((now - started) / 1000).toFixed(0)}s | chats/s sent ${((counts.sent - last.sent) / s).toFixed(0)} acked ${((counts.acked - last.acked) / s).toFixed(0)} | ` +
        `ack p99 ${Number.isFinite(a.p99) ? a.p99.toFixed(1) : '-'} ms | in flight ${inFlight} | node_lost ${counts.nodeLost} | reconnects ${counts.reconnects} | live nodes ${cluster.live().length}/${NODES}`,
    );
    last = { at: now, sent: counts.sent, acked: counts.acked };
  }, 1000);

  await sleep(DURATION * 1000);
  stopLoad();
  clearInterval(killTimer);
  await killing;
  const measuredTo = performance.now();
  const atEnd = { ...counts };
  // Let every chat in flight end (node_lost retries included).
  const settleUntil = performance.now() + SETTLE_SECONDS * 1000;
  while (clients.some((c) => c.inFlight > 0) && performance.now() < settleUntil) await sleep(100);
  clearInterval(progress);
  const unsettled = clients.reduce((n, c) => n + c.inFlight, 0);
  for (const c of clients) c.close();

  // ---------- stop, verify, clean up ----------
  await cluster.stop(30_000);
  let verification: ClusterVerification;
  try {
    verification = await verifyLedgerInPostgres(database.url, ledger);
  } finally {
    await database.drop();
    await deleteRedisKeys(redisUrl, redisPrefix);
  }

  const seconds = (measuredTo - started) / 1000;
  const ackMs = summarize(ack.between(started, measuredTo));
  const ttftMs = summarize(ttft.between(started, measuredTo));
  const lostAfterKill = summarize(nodeLostAfterKillMs);
  const lost = verification.lostAcked.length;
  const problems =
    lost +
    verification.lostReplies.length +
    verification.unended.length +
    verification.statusMismatches.length +
    verification.corruptConversations.length +
    ledger.duplicateEnds +
    ledger.seqGaps;
  const errorList =
    Object.entries(errors)
      .map(([k, v]) => `${k}:${v}`)
      .join(' ') || 'none';
  printTable(
    `load (cluster) — ${NODES} nodes, ${CLIENTS} clients, ${CHATS_PER_SECOND} chats/s offered for ${DURATION}s, ` +
      `${KILL_EVERY > 0 ? `one node SIGKILLed and restarted every ${KILL_EVERY}s` : 'no kills'}; loopback`,
    ['figure', 'value'],
    [
      ['chats/s sent / acked', `${(atEnd.sent / seconds).toFixed(1)} / ${(atEnd.acked / seconds).toFixed(1)}`],
      ['chats not sent (every client at --max-in-flight or reconnecting)', String(skipped)],
      ['ack ms p50 / p99 / p999', `${ackMs.p50.toFixed(2)} / ${ackMs.p99.toFixed(2)} / ${ackMs.p999.toFixed(2)} (n=${ackMs.n})`],
      ['time to first token ms p50 / p99', `${ttftMs.p50.toFixed(2)} / ${ttftMs.p99.toFixed(2)} (n=${ttftMs.n})`],
      ['nodes killed (restart ms)', kills.map((k) => `${k.node}@${k.atS}s (${k.restartMs})`).join(', ') || 'none'],
      ['client reconnects / moved to another node / streams resumed', `${counts.reconnects} / ${counts.movedToAnotherNode} / ${counts.resumedStreams}`],
      ['node_lost ends / retried as new chats', `${counts.nodeLost} / ${counts.retriedAfterNodeLost}`],
      ['node_lost heard after the kill ms p50 / max', counts.nodeLost > 0 ? `${lostAfterKill.p50} / ${Math.max(...nodeLostAfterKillMs)}` : '-'],
      [
        'sends cut off before their ack: sent again (same clientMessageId) / answered as duplicates / left unanswered',
        `${counts.resentAfterConnectionLost} / ${counts.duplicateAcks} / ${counts.unanswered}`,
      ],
      ['cache hits (acks with status cached)', String(counts.cachedAcks)],
      ['cancels sent / chats ended cancelled', `${counts.cancelsSent} / ${counts.cancelled}`],
      ['errors by code', errorList],
      ['delta seq gaps or repeats / double ends', `${ledger.seqGaps} / ${ledger.duplicateEnds}`],
      ['chats still in flight after settle', String(unsettled)],
      ['acknowledged chats checked in PostgreSQL / lost', `${verification.acked} / ${lost}`],
      ['replies announced by chat.done checked / lost', `${verification.replies} / ${verification.lostReplies.length}`],
      ['acknowledged tasks without an end / stored status not the one announced', `${verification.unended.length} / ${verification.statusMismatches.length}`],
      ['conversations out of order / tasks left queued or running', `${verification.corruptConversations.length} / ${verification.unfinishedTasks}`],
    ],
  );
  if (verification.statusMismatches.length > 0) log(`load: status mismatches (first 10): ${JSON.stringify(verification.statusMismatches.slice(0, 10))}`);
  if (verification.unended.length > 0) log(`load: tasks without an end (first 10): ${verification.unended.slice(0, 10).join(', ')}`);
  console.log(
    JSON.stringify({
      bench: 'load-cluster',
      nodes: NODES,
      killNodeEverySeconds: KILL_EVERY,
      clients: CLIENTS,
      offeredChatsPerSecond: CHATS_PER_SECOND,
      seconds: +seconds.toFixed(1),
      chatsPerSecond: { sent: +(atEnd.sent / seconds).toFixed(1), acked: +(atEnd.acked / seconds).toFixed(1) },
      skipped,
      ackMs,
      ttftMs,
      kills,
      reconnects: counts.reconnects,
      movedToAnotherNode: counts.movedToAnotherNode,
      resumedStreams: counts.resumedStreams,
      nodeLost: counts.nodeLost,
      nodeLostAfterKillMs: counts.nodeLost > 0 ? { p50: lostAfterKill.p50, max: Math.max(...nodeLostAfterKillMs) } : null,
      retriedAfterNodeLost: counts.retriedAfterNodeLost,
      resentAfterConnectionLost: counts.resentAfterConnectionLost,
      duplicateAcks: counts.duplicateAcks,
      unansweredSends: counts.unanswered,
      cachedAcks: counts.cachedAcks,
      cancels: { sent: counts.cancelsSent, ended: counts.cancelled },
      errors,
      seqGaps: ledger.seqGaps,
      duplicateEnds: ledger.duplicateEnds,
      unsettled,
      verified: {
        acked: verification.acked,
        lost,
        replies: verification.replies,
        lostReplies: verification.lostReplies.length,
        unended: verification.unended.length,
        statusMismatches: verification.statusMismatches.length,
        corruptConversations: verification.corruptConversations.length,
        unfinishedTasks: verification.unfinishedTasks,
      },
      problems,
    }),
  );
  return problems > 0 || unsettled > 0 ? 1 : 0;
}
