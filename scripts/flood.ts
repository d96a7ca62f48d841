/**
 * Floods a chatwire child process the way one client would, and measures what it costs the server and another
 * user. Two attacks (docs/rate-limits.md):
 *
 *   npm run flood -- handshakes [--seconds 60] [--connections 16]
 *     a client without credentials looping keep-alive `GET /socket.io/?EIO=4&transport=polling`: the server's RSS
 *     before, at its peak and after, a logged-in user's chats acked, and the graceful shutdown under the flood.
 *   npm run flood -- streams [--seconds 10] [--requests 3000] [--concurrency 50]
 *     one user asking for thousands of SSE streams of its running task: the streams it holds at most, and another
 *     user's ack p50 alone and beside it.
 *
 * Prints a table and a JSON line.
 */
import fs from 'node:fs';
import http from 'node:http';
import WebSocket from 'ws';
import { connect } from '../src/client/client.js';
import { parseArgs, printTable, sleep, startChatwire, summarize } from './bench-support.js';

const mode = process.argv[2] ?? 'handshakes';
const args = parseArgs({ seconds: mode === 'streams' ? '10' : '60', connections: '16', requests: '3000', concurrency: '50' });

function rssMiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** A logged-in user on /ws (chatwire's client library) sending a chat every `everyMs`, timing each ack. */
async function chatter(port: number, user: string, everyMs: number) {
  const client = connect(`ws://127.0.0.1:${port}/ws`, { user, WebSocket, reconnect: false, heartbeatMs: 0 });
  await client.ready();
  let acks: number[] = [];
  let sent = 0;
  let errors = 0;
  let unanswered = 0;
  const timer = setInterval(() => {
    sent++;
    unanswered++;
    const at = performance.now();
    client.chat
      .send(`${user} says ${sent}`, { params: { maxTokens: 4 } })
      .then(
        () => acks.push(performance.now() - at),
        () => (errors += 1),
      )
      .finally(() => (unanswered -= 1));
  }, everyMs);
  return {
    /** Acks since the last call, and what was sent and refused so far. */
    take() {
      const out = acks;
      acks = [];
      return { acks: out, sent, errors, unanswered };
    },
    close() {
      clearInterval(timer);
      client.close();
    },
  };
}

function get(port: number, path: string, agent: http.Agent): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
  });
}

async function handshakes(): Promise<void> {
  const seconds = Number(args.seconds);
  // The bounds before login at their defaults: they are what is measured.
  const server = await startChatwire({ CHATWIRE_DEV_TOKEN_DELAY_MS: '0', CHATWIRE_MAX_PENDING_CONNECTIONS: '1024', CHATWIRE_MAX_PENDING_PER_ADDRESS: '32' });
  const pid = server.child.pid as number;
  await sleep(2000);
  const before = rssMiB(pid);
  const user = await chatter(server.port, 'legit', 200);
  const agent = new http.Agent({ keepAlive: true, maxSockets: Number(args.connections) });
  const statuses = new Map<number | string, number>();
  let flooding = true;
  const loop = async () => {
    while (flooding) {
      // A request that gets no answer: the server is shutting down (that is part of the run).
      const status = await get(server.port, '/socket.io/?EIO=4&transport=polling', agent).catch(() => 'no answer');
      statuses.set(status, (statuses.get(status) ?? 0) + 1);
      if (status === 'no answer') await sleep(10);
    }
  };
  const loops = Array.from({ length: Number(args.connections) }, loop);
  let peak = before;
  const acks: number[] = [];
  for (let s = 0; s < seconds; s++) {
    await sleep(1000);
    peak = Math.max(peak, rssMiB(pid));
    acks.push(...user.take().acks);
  }
  const after = rssMiB(pid);
  await sleep(500);
  const chats = user.take();
  acks.push(...chats.acks);
  user.close();
  // Graceful shutdown with the flood still running: main.ts exits 0 when it finished within its deadline.
  const stopAt = performance.now();
  const exit = new Promise<number | null>((resolve) => server.child.once('exit', (code) => resolve(code)));
  server.child.kill('SIGTERM');
  const code = await exit;
  const shutdownMs = performance.now() - stopAt;
  flooding = false;
  await Promise.all(loops);
  agent.destroy();
  await server.stop();

  const handshakesSent = [...statuses.values()].reduce((a, b) => a + b, 0);
  const ack = summarize(acks);
  printTable(
    `one client without credentials looping polling handshakes on ${args.connections} keep-alive connections for ${seconds} s`,
    ['RSS before MiB', 'RSS peak MiB', 'RSS after MiB', 'growth MiB', 'handshakes', 'answers'],
    [[before, peak, after, peak - before, handshakesSent, JSON.stringify(Object.fromEntries(statuses))]],
  );
  printTable(
    'the logged-in user, one chat every 200 ms',
    ['chats sent', 'acked', 'refused', 'unanswered', 'ack p50 ms', 'ack p99 ms', 'shutdown ms', 'exit code'],
    [[chats.sent, acks.length, chats.errors, chats.unanswered, ack.p50, ack.p99, shutdownMs, String(code)]],
  );
  console.log(
    JSON.stringify({
      mode,
      seconds,
      connections: Number(args.connections),
      rssBeforeMiB: before,
      rssPeakMiB: peak,
      rssAfterMiB: after,
      handshakes: handshakesSent,
      statuses: Object.fromEntries(statuses),
      chatsSent: chats.sent,
      acked: acks.length,
      ackP50Ms: ack.p50,
      ackP99Ms: ack.p99,
      shutdownMs,
      exitCode: code,
    }),
  );
}

async function streams(): Promise<void> {
  const seconds = Number(args.seconds);
  // The per-user connection cap at its default; a task that streams for the whole run.
  const server = await startChatwire({ CHATWIRE_MAX_CONNECTIONS_PER_USER: '16', CHATWIRE_DEV_TOKEN_DELAY_MS: '15' });
  const base = `http://127.0.0.1:${server.port}`;
  const started = await fetch(`${base}/v1/chat?user=streamer`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'stream me', params: { maxTokens: 4000 }, cache: 'bypass' }),
  });
  if (started.status !== 202) throw new Error(`the streamed chat was refused: ${started.status} ${await started.text()}`);
  const { taskId } = (await started.json()) as { taskId: string };
  const other = await chatter(server.port, 'other', 100);
  await sleep(1000);
  other.take();
  await sleep(seconds * 1000);
  const alone = summarize(other.take().acks);

  const statuses = new Map<number, number>();
  let held = 0;
  let maxHeld = 0;
  const aborts: AbortController[] = [];
  let issued = 0;
  const total = Number(args.requests);
  const deadline = performance.now() + seconds * 1000;
  const loop = async () => {
    while (issued < total && performance.now() < deadline) {
      issued += 1;
      const abort = new AbortController();
      const res = await fetch(`${base}/v1/tasks/${taskId}/stream?user=streamer`, { signal: abort.signal }).catch(() => null);
      if (res === null) continue;
      statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
      if (res.status === 200) {
        held += 1;
        maxHeld = Math.max(maxHeld, held);
        aborts.push(abort);
        // Read the stream (every delta of the task is written to it) until the run ends.
        void res.body
          ?.pipeTo(new WritableStream())
          .catch(() => {})
          .finally(() => (held -= 1));
      } else await res.arrayBuffer();
    }
  };
  await Promise.all(Array.from({ length: Number(args.concurrency) }, loop));
  await sleep(Math.max(0, deadline - performance.now()));
  const beside = summarize(other.take().acks);
  for (const a of aborts) a.abort();
  other.close();
  await server.stop();

  printTable(
    `one user asking for ${issued} SSE streams of its running task (${args.concurrency} at a time), another user chatting every 100 ms (${seconds} s per phase)`,
    ['phase', 'acks', 'ack p50 ms', 'ack p99 ms'],
    [
      ['alone', alone.n, alone.p50, alone.p99],
      ['beside the streams', beside.n, beside.p50, beside.p99],
      ['p50 beside / alone', '', (beside.p50 / alone.p50).toFixed(2) + 'x', 'target <= 3x'],
    ],
  );
  printTable(
    'the streaming user',
    ['stream requests', 'answers', 'held at most', 'cap'],
    [[issued, JSON.stringify(Object.fromEntries(statuses)), maxHeld, 16]],
  );
  console.log(
    JSON.stringify({
      mode,
      seconds,
      requests: issued,
      statuses: Object.fromEntries(statuses),
      maxHeld,
      cap: 16,
      aloneP50Ms: alone.p50,
      besideP50Ms: beside.p50,
      ratio: beside.p50 / alone.p50,
    }),
  );
}

await (mode === 'streams' ? streams() : handshakes());
