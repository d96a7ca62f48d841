/**
 * Cluster mode end to end: three real chatwire processes on one PostgreSQL
 * database and one Redis key prefix, driven through the public protocol only
 * (/ws, HTTP, SSE). A chat is resumed, cancelled and read back across nodes;
 * a node is killed with SIGKILL mid-stream; identical chats on different nodes
 * share one model call; a user's chats and connections meet one limit across
 * nodes; a reply computed on one node is a cache hit on another; Redis and
 * PostgreSQL go away under traffic and come back.
 *
 * Redis and PostgreSQL are the test servers (see test/helpers/postgres.ts and
 * redis.ts), never stopped: the Redis outage runs on a redis-server of the
 * test's own, the PostgreSQL outage through a TCP proxy the test cuts.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { readSse, refusedUpgrade, WsClient } from '../helpers/clients.js';
import { clusterLogs, clusterTestOptions, RedisServer, startCluster, TcpProxy, type ClusterNode, type TestCluster } from '../helpers/cluster.js';
import { TEST_DATABASE_URL } from '../helpers/postgres.js';

type Msg = Record<string, unknown> & { type: string };

const options = await clusterTestOptions();
/** The contract: readers on other nodes hear of a dead node's tasks within 15 s. */
const NODE_LOST_BOUND_MS = 15_000;
/** How long a test waits for a state it polls for (readiness after a fault, a slot freed): generous, not a measure. */
const SETTLE_MS = 45_000;

const run = crypto.randomBytes(3).toString('hex');
const userOf = (label: string) => `${label}-${run}`;

/** Sends a request with an id and waits (up to `timeoutMs`) for the reply carrying that id. */
async function request(c: WsClient, message: Record<string, unknown>, timeoutMs = 30_000): Promise<Msg> {
  const id = `r${crypto.randomBytes(4).toString('hex')}`;
  c.send({ ...message, id });
  return (await c.next((m) => (m as { id?: string }).id === id, timeoutMs)) as Msg;
}

/** The next `count` deltas of a task on this connection. */
async function deltas(c: WsClient, taskId: string, count: number): Promise<Msg[]> {
  const out: Msg[] = [];
  while (out.length < count) out.push((await c.next((m) => m.type === 'chat.delta' && m.taskId === taskId, 20_000)) as Msg);
  return out;
}

/** The rest of a task on this connection: its deltas, then its chat.done or chat.error. */
async function rest(c: WsClient, taskId: string, timeoutMs = 30_000): Promise<{ deltas: Msg[]; end: Msg }> {
  const out: Msg[] = [];
  for (;;) {
    const m = (await c.next((x) => x.taskId === taskId && ['chat.delta', 'chat.done', 'chat.error'].includes(x.type), timeoutMs)) as Msg;
    if (m.type === 'chat.delta') out.push(m);
    else return { deltas: out, end: m };
  }
}

function assertContiguous(list: Msg[], from: number, what: string): void {
  assert.deepEqual(
    list.map((d) => d.seq),
    list.map((_, i) => from + i),
    `${what}: deltas must come in seq order from ${from}, with no gap and no repeat`,
  );
}

/** Polls `probe` until `ok` holds; fails with the last value seen after `timeoutMs`. */
async function waitFor<T>(what: string, probe: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = SETTLE_MS): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  let lastError: unknown;
  for (;;) {
    try {
      last = await probe();
      if (ok(last)) return last;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline)
      assert.fail(`${what}: not within ${timeoutMs} ms; last seen ${lastError === undefined ? JSON.stringify(last) : String(lastError)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function readyz(node: ClusterNode): Promise<{ status: number; body: string }> {
  const res = await fetch(`${node.http}/readyz`, { signal: AbortSignal.timeout(10_000) });
  return { status: res.status, body: await res.text() };
}

/** A chat from send to end on one connection: the ack, the deltas, the end. */
async function chat(c: WsClient, fields: Record<string, unknown>): Promise<{ ack: Msg; deltas: Msg[]; end: Msg; text: string }> {
  const ack = await request(c, { type: 'chat.send', ...fields });
  assert.equal(ack.type, 'chat.ack', `chat.send answered ${JSON.stringify(ack)}`);
  const r = await rest(c, ack.taskId as string);
  return { ack, ...r, text: r.deltas.map((d) => d.text).join('') };
}

/** Every message of a conversation, read on one connection (pages of 100 back to the start). */
async function history(c: WsClient, conversationId: string): Promise<Msg[]> {
  const out: Msg[] = [];
  let before: string | undefined;
  for (;;) {
    const page = await request(c, { type: 'conversation.history', conversationId, limit: 100, ...(before ? { before } : {}) });
    assert.equal(page.type, 'conversation.history', JSON.stringify(page));
    const messages = page.messages as Msg[];
    out.unshift(...messages);
    if (!page.hasMore || messages.length === 0) return out;
    before = messages[0]?.messageId as string;
  }
}

describe('cluster mode: three nodes, one chat service', options, () => {
  let cluster: TestCluster;
  const open: WsClient[] = [];
  const connect = async (node: ClusterNode, user: string) => {
    const c = await WsClient.connect(node.ws, { user });
    open.push(c);
    return c;
  };
  before(async () => {
    // 40 ms per token: a 200-token reply streams for 8 s, long enough to be met mid-stream on every node.
    cluster = await startCluster({ nodes: 3, env: { CHATWIRE_DEV_TOKEN_DELAY_MS: '40' } });
  });
  after(async () => {
    for (const c of open) await c.terminate().catch(() => {});
    await cluster?.stop();
  });

  test('a chat sent on A is resumed on B mid-stream exactly, cancelled from C, and reads back the same on every node', async () => {
    const [A, B, C] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    const user = userOf('roam');
    const a = await connect(A, user);
    const question = `tell me a long story (${run})`;
    const ack = await request(a, { type: 'chat.send', text: question, cache: 'bypass', params: { maxTokens: 200 } });
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    const taskId = ack.taskId as string;
    const firstOnA = await deltas(a, taskId, 4);

    // B picks the stream up where A's reader is, while it is still streaming.
    const b = await connect(B, user);
    const fromSeq = firstOnA.length;
    const resumed = await request(b, { type: 'chat.resume', taskId, fromSeq });
    assert.equal(resumed.type, 'ok', `chat.resume on B answered ${JSON.stringify(resumed)}`);
    const firstOnB = await deltas(b, taskId, 3);
    assert.equal(firstOnB[0]?.seq, fromSeq, 'the resume on B starts at the seq asked for');

    // C cancels a task it never saw.
    const c = await connect(C, user);
    const cancelled = await request(c, { type: 'chat.cancel', taskId });
    assert.equal(cancelled.type, 'ok', `chat.cancel on C answered ${JSON.stringify(cancelled)}`);

    const restA = await rest(a, taskId);
    const restB = await rest(b, taskId);
    const onA = [...firstOnA, ...restA.deltas];
    const onB = [...firstOnB, ...restB.deltas];
    assertContiguous(onA, 0, 'the sender on A');
    assertContiguous(onB, fromSeq, 'the resumer on B');
    assert.deepEqual(
      onB.map((d) => d.text),
      onA.slice(fromSeq).map((d) => d.text),
      'B gets the very deltas A got from fromSeq on',
    );
    for (const [who, end] of [
      ['A', restA.end],
      ['B', restB.end],
    ] as const) {
      assert.equal(end.type, 'chat.done', `${who} ends with ${JSON.stringify(end)}`);
      assert.equal(end.finishReason, 'cancelled', `${who}: the task was cancelled from C`);
    }
    assert.equal(restB.end.messageId, restA.end.messageId);
    assert.ok(onA.length < 200, `the cancel stopped the reply (${onA.length} of 200 deltas)`);
    const text = onA.map((d) => d.text).join('');
    const n = onA.length;

    for (const node of [A, B, C]) {
      const reader = await connect(node, user);
      const task = await request(reader, { type: 'task.get', taskId });
      assert.equal(task.type, 'task', `task.get on ${node.name}: ${JSON.stringify(task)}`);
      const info = task.task as Msg;
      assert.deepEqual([info.status, info.seq, info.text], ['cancelled', n, text], `task.get on ${node.name}`);

      const messages = await history(reader, ack.conversationId as string);
      assert.deepEqual(
        messages.map((m) => [m.messageId, m.role, m.text]),
        [
          [ack.messageId, 'user', question],
          [restA.end.messageId, 'assistant', text],
        ],
        `conversation.history on ${node.name}`,
      );

      const viaHttp = (await (await fetch(`${node.http}/v1/tasks/${taskId}?user=${user}`)).json()) as Msg;
      assert.deepEqual([viaHttp.status, viaHttp.seq, viaHttp.text], ['cancelled', n, text], `GET /v1/tasks/:id on ${node.name}`);

      const stream = await fetch(`${node.http}/v1/tasks/${taskId}/stream?user=${user}`);
      assert.equal(stream.status, 200, `the SSE stream on ${node.name}`);
      const events = await readSse(stream);
      const sseDeltas = events.filter((e) => e.event === 'delta');
      assert.deepEqual(
        sseDeltas.map((e) => e.id),
        onA.map((d) => String(d.seq)),
        `SSE ids on ${node.name}`,
      );
      assert.equal(sseDeltas.map((e) => e.data.text).join(''), text, `SSE text on ${node.name}`);
      assert.deepEqual(
        events.slice(sseDeltas.length).map((e) => [e.event, e.data.finishReason]),
        [['done', 'cancelled']],
        `the SSE stream on ${node.name} ends with its done`,
      );
      await reader.close();
    }
  });

  test('identical chats on different nodes share one model call', async () => {
    const question = `the same question on every node (${run})`;
    const calls = () => cluster.metricSum('chatwire_model_calls_total');
    const before = await calls();
    const clients = await Promise.all(cluster.nodes.map((node, i) => connect(node, userOf(`same-${i}`))));
    const first = await request(clients[0] as WsClient, { type: 'chat.send', text: question, params: { maxTokens: 48 } });
    assert.equal(first.type, 'chat.ack', JSON.stringify(first));
    // The others ask while the first reply streams.
    const others = await Promise.all(clients.slice(1).map((c) => request(c, { type: 'chat.send', text: question, params: { maxTokens: 48 } })));
    const acks = [first, ...others];
    for (const ack of acks) assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    const ends = await Promise.all(clients.map((c, i) => rest(c, acks[i]?.taskId as string)));
    const texts = ends.map((e) => e.deltas.map((d) => d.text).join(''));
    for (const [i, e] of ends.entries()) {
      assert.equal(e.end.type, 'chat.done', `node ${cluster.node(i).name}: ${JSON.stringify(e.end)}`);
      assertContiguous(e.deltas, 0, `the reader on node ${cluster.node(i).name}`);
      assert.equal(texts[i], texts[0], `node ${cluster.node(i).name} streams the same reply`);
    }
    assert.equal(await calls(), before + 1, 'one model call for three identical chats on three nodes (chatwire_model_calls_total summed over the nodes)');
  });

  test('a reply computed on node A is a cache hit on node B', async () => {
    const [A, B] = [cluster.node(0), cluster.node(1)];
    const question = `a question asked once on A (${run})`;
    const first = await chat(await connect(A, userOf('cache-a')), { text: question });
    assert.equal(first.ack.status, 'queued');
    assert.equal(first.end.type, 'chat.done', JSON.stringify(first.end));
    assert.equal(first.end.cached, false);
    const calls = await cluster.metricSum('chatwire_model_calls_total');
    // The reply is written to the shared level after chat.done: give that write a moment.
    await new Promise((r) => setTimeout(r, 1000));
    const second = await chat(await connect(B, userOf('cache-b')), { text: question });
    assert.equal(second.ack.status, 'cached', `the ack on B: ${JSON.stringify(second.ack)}`);
    assert.equal(second.end.type, 'chat.done', JSON.stringify(second.end));
    assert.equal(second.end.cached, true);
    assert.equal(second.text, first.text);
    assert.equal(await cluster.metricSum('chatwire_model_calls_total'), calls, 'no model call for the hit');
  });

  test('a node killed with SIGKILL mid-stream: node_lost on the other nodes within 15 s, the task errored, no acknowledged message lost', async () => {
    const [A, B, C] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    const user = userOf('doomed');
    const a = await connect(A, user);
    const ack = await request(a, { type: 'chat.send', text: `a reply that will not finish (${run})`, cache: 'bypass', params: { maxTokens: 400 } });
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    const taskId = ack.taskId as string;
    await deltas(a, taskId, 2);

    // Readers of the task on B (chat.resume) and C (the SSE stream).
    const b = await connect(B, user);
    assert.equal((await request(b, { type: 'chat.resume', taskId, fromSeq: 0 })).type, 'ok');
    const seenOnB = await deltas(b, taskId, 3);
    const sse = fetch(`${C.http}/v1/tasks/${taskId}/stream?user=${user}`).then(async (res) => ({ status: res.status, events: await readSse(res) }));

    // Chats acknowledged by A right up to the kill, from two users.
    const writerUsers = [userOf('writer-1'), userOf('writer-2')];
    const writers = await Promise.all(writerUsers.map((u) => connect(A, u)));
    const settled = await Promise.all(
      writers.flatMap((w, i) =>
        Array.from({ length: 6 }, (_, k) => request(w, { type: 'chat.send', text: `writer ${i} message ${k} (${run})`, cache: 'bypass' })),
      ),
    );
    for (const r of settled) assert.equal(r.type, 'chat.ack', JSON.stringify(r));
    // More in flight as the node dies: whichever of them were acknowledged count too.
    for (const [i, w] of writers.entries())
      for (let k = 6; k < 12; k++) w.send({ type: 'chat.send', id: `late-${k}`, text: `writer ${i} message ${k} (${run})`, cache: 'bypass' });
    const killedAt = Date.now();
    await cluster.kill(0);

    const end = (await b.next((m) => m.taskId === taskId && (m.type === 'chat.error' || m.type === 'chat.done'), NODE_LOST_BOUND_MS + 15_000)) as Msg;
    const heardAfterMs = Date.now() - killedAt;
    assert.equal(end.type, 'chat.error', `the reader on B got ${JSON.stringify(end)}`);
    assert.equal(end.code, 'node_lost');
    assert.equal(end.retryable, true);
    assert.ok(heardAfterMs <= NODE_LOST_BOUND_MS, `node_lost reached B ${heardAfterMs} ms after the kill; the contract is ${NODE_LOST_BOUND_MS} ms`);
    const onB = b.received.filter((m) => m.type === 'chat.delta' && m.taskId === taskId) as Msg[];
    assertContiguous(onB, 0, 'the reader on B');
    assert.ok(onB.length >= seenOnB.length);

    const viaSse = await sse;
    assert.equal(viaSse.status, 200);
    const last = viaSse.events.at(-1);
    assert.deepEqual([last?.event, last?.data.code], ['error', 'node_lost'], `the SSE stream on C ends with node_lost: ${JSON.stringify(last)}`);

    const info = await waitFor(
      'task.get on B says error',
      async () => (await request(b, { type: 'task.get', taskId })).task as Msg,
      (t) => t?.status === 'error',
      NODE_LOST_BOUND_MS,
    );
    assert.equal(info.status, 'error');

    // Every acknowledged message is in its conversation, read from the nodes that survived.
    const acked = writers.flatMap((w) => w.received.filter((m) => m.type === 'chat.ack')) as Msg[];
    assert.ok(acked.length >= 12, `${acked.length} chats acknowledged before the kill`);
    for (const [i, u] of writerUsers.entries()) {
      const mine = writers[i]?.received.filter((m) => m.type === 'chat.ack') as Msg[];
      for (const node of [B, C]) {
        const reader = await connect(node, u);
        for (const m of mine) {
          const stored = await history(reader, m.conversationId as string);
          assert.ok(
            stored.some((s) => s.messageId === m.messageId && s.role === 'user'),
            `acknowledged message ${m.messageId as string} of ${u} is not in its conversation on node ${node.name}`,
          );
        }
        await reader.close();
      }
    }
    const own = await history(b, ack.conversationId as string);
    assert.ok(own.some((s) => s.messageId === ack.messageId));

    // A comes back on its data dir and serves the cluster again.
    const A2 = await cluster.restart(0);
    const again = await connect(A2, user);
    const lost = await request(again, { type: 'task.get', taskId });
    assert.equal((lost.task as Msg | undefined)?.status, 'error', `task.get on the restarted A: ${JSON.stringify(lost)}`);
    const fresh = await chat(again, { text: `after the restart (${run})`, cache: 'bypass' });
    assert.equal(fresh.end.type, 'chat.done', `${JSON.stringify(fresh.end)}\n${clusterLogs([A2])}`);
  });
});

describe('cluster mode: one user, one set of limits across the nodes', options, () => {
  let cluster: TestCluster;
  const open: WsClient[] = [];
  const connect = async (node: ClusterNode, user: string) => {
    const c = await WsClient.connect(node.ws, { user });
    open.push(c);
    return c;
  };
  before(async () => {
    cluster = await startCluster({
      nodes: 3,
      env: { CHATWIRE_CHATS_PER_MINUTE: '6', CHATWIRE_MAX_CONNECTIONS_PER_USER: '3', CHATWIRE_DEV_TOKEN_DELAY_MS: '0' },
    });
  });
  after(async () => {
    for (const c of open) await c.terminate().catch(() => {});
    await cluster?.stop();
  });

  test("a user's chat burst spread over the nodes meets one bucket", async () => {
    const user = userOf('burst');
    const clients = await Promise.all(cluster.nodes.map((n) => connect(n, user)));
    // Six chats a minute: eighteen at once, six on each node.
    const replies = await Promise.all(
      clients.flatMap((c, i) => Array.from({ length: 6 }, (_, k) => request(c, { type: 'chat.send', text: `burst ${i}.${k} (${run})`, cache: 'bypass' }))),
    );
    const acked = replies.filter((r) => r.type === 'chat.ack');
    const limited = replies.filter((r) => r.type === 'error' && r.code === 'rate_limited');
    assert.equal(acked.length, 6, `acks across the nodes: ${acked.length} (${JSON.stringify(replies.map((r) => r.code ?? r.type))})`);
    assert.equal(limited.length, 12, 'every other chat is rate_limited');
    for (const r of limited) assert.ok(typeof r.retryAfterMs === 'number' && r.retryAfterMs > 0, JSON.stringify(r));
  });

  test('the per-user connection cap counts connections on every node', async () => {
    const [A, B, C] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    const user = userOf('capped');
    await connect(A, user);
    const onB = await connect(B, user);
    await connect(C, user);
    for (const node of [A, B, C]) {
      const refused = await refusedUpgrade(`${node.ws}?user=${user}`);
      assert.equal(refused.status, 429, `a fourth connection on ${node.name}`);
      assert.equal((JSON.parse(refused.body) as { error: { code: string } }).error.code, 'rate_limited');
    }
    // A slot freed on B is free on C.
    await onB.close();
    const next = await waitFor(
      'a connection on C once one on B closed',
      () => connect(C, user),
      () => true,
    );
    assert.equal((await request(next, { type: 'ping' })).type, 'pong');
  });
});

describe('cluster mode: Redis stopped and started again under traffic', options, () => {
  let redis: RedisServer;
  let cluster: TestCluster;
  const open: WsClient[] = [];
  const connect = async (node: ClusterNode, user: string) => {
    const c = await WsClient.connect(node.ws, { user });
    open.push(c);
    return c;
  };
  before(async () => {
    redis = await RedisServer.start();
    cluster = await startCluster({ nodes: 3, redisUrl: redis.url, env: { CHATWIRE_DEV_TOKEN_DELAY_MS: '40' } });
  });
  after(async () => {
    for (const c of open) await c.terminate().catch(() => {});
    await cluster?.stop();
    await redis?.stop();
  });

  test('the nodes keep serving, report redis degraded while ready, and rejoin without a restart', async () => {
    const nodes = cluster.nodes;
    const pids = nodes.map((n) => n.process.child.pid);
    const user = userOf('through-redis');
    const clients = await Promise.all(nodes.map((n) => connect(n, user)));
    for (const n of nodes) assert.doesNotMatch((await readyz(n)).body, /degraded/, `node ${n.name} before the outage`);

    // A chat streaming on A when Redis goes.
    const a = clients[0] as WsClient;
    const long = await request(a, { type: 'chat.send', text: `streaming through the outage (${run})`, cache: 'bypass', params: { maxTokens: 150 } });
    assert.equal(long.type, 'chat.ack');
    await deltas(a, long.taskId as string, 2);
    await redis.stop();

    // Ready all along: every /readyz answer from here to Redis's return is a 200.
    const notReady: string[] = [];
    const watched = (n: ClusterNode) => async () => {
      const r = await readyz(n);
      if (r.status !== 200) notReady.push(`node ${n.name}: ${r.status} ${r.body}`);
      return r;
    };
    for (const n of nodes) {
      const r = await waitFor(`node ${n.name}: /readyz 200 with redis degraded`, watched(n), (x) => /"redis":"degraded"/.test(x.body));
      assert.equal(r.status, 200);
    }
    // Every node still takes and answers chats.
    for (const [i, c] of clients.entries()) {
      const r = await chat(c, { text: `a chat while Redis is down, on ${nodes[i]?.name} (${run})`, cache: 'bypass', params: { maxTokens: 8 } });
      assert.equal(r.end.type, 'chat.done', `node ${nodes[i]?.name}: ${JSON.stringify(r.end)}`);
      assertContiguous(r.deltas, 0, `node ${nodes[i]?.name}`);
    }
    // The chat started before the outage streamed on to its reader on its own node.
    const tail = await rest(a, long.taskId as string);
    assert.equal(tail.end.type, 'chat.done', `the chat on A through the outage ended with ${JSON.stringify(tail.end)}`);
    const all = a.received.filter((m) => m.type === 'chat.delta' && m.taskId === long.taskId) as Msg[];
    assertContiguous(all, 0, 'the reader on A through the outage');
    for (const n of nodes) assert.match((await watched(n)()).body, /"redis":"degraded"/, `node ${n.name} while Redis is still down`);
    assert.deepEqual(notReady, [], '/readyz stays 200 while Redis is down');

    await redis.start();
    for (const n of nodes) {
      await waitFor(
        `node ${n.name}: /readyz 200 without degraded once Redis is back`,
        () => readyz(n),
        (x) => x.status === 200 && !/degraded/.test(x.body),
      );
    }
    assert.deepEqual(
      nodes.map((n) => [n.process.child.pid, n.process.child.exitCode, n.process.child.signalCode]),
      pids.map((pid) => [pid, null, null]),
      'no node was restarted',
    );
    // Rejoined: a chat on A resumes on B again, exactly.
    const [, b, c] = clients as [WsClient, WsClient, WsClient];
    const ack = await request(a, { type: 'chat.send', text: `after Redis came back (${run})`, cache: 'bypass', params: { maxTokens: 40 } });
    assert.equal(ack.type, 'chat.ack');
    const taskId = ack.taskId as string;
    await deltas(a, taskId, 2);
    const resumed = await request(b, { type: 'chat.resume', taskId, fromSeq: 0 });
    assert.equal(resumed.type, 'ok', `chat.resume on B after Redis came back: ${JSON.stringify(resumed)}`);
    const [onA, onB] = await Promise.all([rest(a, taskId), rest(b, taskId)]);
    const fullA = a.received.filter((m) => m.type === 'chat.delta' && m.taskId === taskId) as Msg[];
    assertContiguous(onB.deltas, 0, 'the resume on B');
    assert.deepEqual(
      onB.deltas.map((d) => d.text),
      fullA.map((d) => d.text),
    );
    assert.equal(onA.end.type, 'chat.done');
    assert.equal(onB.end.type, 'chat.done');
    // And C's task.get sees it.
    assert.equal(((await request(c, { type: 'task.get', taskId })).task as Msg).status, 'done');
  });
});

describe('cluster mode: PostgreSQL unreachable and back', options, () => {
  let proxy: TcpProxy;
  let cluster: TestCluster;
  const open: WsClient[] = [];
  const connect = async (node: ClusterNode, user: string) => {
    const c = await WsClient.connect(node.ws, { user });
    open.push(c);
    return c;
  };
  before(async () => {
    const pg = new URL(TEST_DATABASE_URL);
    proxy = await TcpProxy.start({ host: pg.hostname, port: Number(pg.port || 5432) });
    cluster = await startCluster({ nodes: 3, databasePort: proxy.port, env: { CHATWIRE_DEV_TOKEN_DELAY_MS: '20' } });
  });
  after(async () => {
    for (const c of open) await c.terminate().catch(() => {});
    proxy?.restore();
    await cluster?.stop();
    await proxy?.close();
  });

  test('readyz 503 naming postgres, new chats overloaded "storage unavailable", nothing acknowledged lost, and recovery without a restart', async () => {
    const nodes = cluster.nodes;
    const pids = nodes.map((n) => n.process.child.pid);
    const user = userOf('through-pg');
    const clients = await Promise.all(nodes.map((n) => connect(n, user)));
    const acked: Msg[] = [];
    for (const [i, c] of clients.entries()) {
      const r = await chat(c, { text: `before the cut, on ${nodes[i]?.name} (${run})`, cache: 'bypass', params: { maxTokens: 8 } });
      assert.equal(r.end.type, 'chat.done');
      acked.push(r.ack);
    }
    // Chats in flight as the way to PostgreSQL is cut.
    const a = clients[0] as WsClient;
    const streaming = await request(a, { type: 'chat.send', text: `streaming as PostgreSQL goes (${run})`, cache: 'bypass', params: { maxTokens: 100 } });
    assert.equal(streaming.type, 'chat.ack');
    acked.push(streaming);
    for (const [i, c] of clients.entries()) c.send({ type: 'chat.send', id: `at-cut-${i}`, text: `sent as PostgreSQL goes, on ${nodes[i]?.name} (${run})` });
    proxy.cut();

    for (const n of nodes) {
      const r = await waitFor(
        `node ${n.name}: /readyz 503 naming postgres`,
        () => readyz(n),
        (x) => x.status === 503,
      );
      assert.match(r.body, /postgres/i, `node ${n.name}: ${r.body}`);
    }
    for (const [i, c] of clients.entries()) {
      const r = await request(c, { type: 'chat.send', text: `a chat while PostgreSQL is unreachable, on ${nodes[i]?.name} (${run})` });
      assert.equal(r.type, 'error', `node ${nodes[i]?.name}: ${JSON.stringify(r)}`);
      assert.equal(r.code, 'overloaded');
      assert.match(r.message as string, /storage unavailable/);
    }
    const viaHttp = await fetch(`${nodes[1]?.http}/v1/chat?user=${user}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ text: `over HTTP while PostgreSQL is unreachable (${run})` }),
    });
    assert.equal(viaHttp.status, 503);
    const body = (await viaHttp.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'overloaded');
    assert.match(body.error.message, /storage unavailable/);

    proxy.restore();
    for (const n of nodes)
      await waitFor(
        `node ${n.name}: /readyz 200 once PostgreSQL is back`,
        () => readyz(n),
        (x) => x.status === 200,
      );
    assert.deepEqual(
      nodes.map((n) => [n.process.child.pid, n.process.child.exitCode, n.process.child.signalCode]),
      pids.map((pid) => [pid, null, null]),
      'no node was restarted',
    );
    for (const [i, c] of clients.entries()) {
      const r = await chat(c, { text: `after PostgreSQL came back, on ${nodes[i]?.name} (${run})`, cache: 'bypass', params: { maxTokens: 8 } });
      assert.equal(r.end.type, 'chat.done', `node ${nodes[i]?.name}: ${JSON.stringify(r.end)}`);
      acked.push(r.ack);
    }
    // Whatever the sends at the cut got, an ack among them counts.
    for (const c of clients) acked.push(...(c.received.filter((m) => m.type === 'chat.ack' && String(m.id).startsWith('at-cut-')) as Msg[]));
    const reader = await connect(nodes[2] as ClusterNode, user);
    for (const m of acked) {
      const stored = await history(reader, m.conversationId as string);
      assert.ok(
        stored.some((s) => s.messageId === m.messageId && s.role === 'user'),
        `acknowledged message ${m.messageId as string} is not in its conversation after the outage`,
      );
    }
  });
});
