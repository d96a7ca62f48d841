/**
 * npm run bench:stalled-readers -- [--clients 200] [--transport ws|websocket|polling] [--seconds 6]
 *                                  [--token-delay-ms 15] [--compression] [--reading]
 *
 * What readers that stop reading cost the server. Starts chatwire as a child process on loopback; then each of
 * --clients clients (one user each) starts two 4,096-token chats, one of them with a 4,000-character system
 * prompt, reads until the first ack and stops reading: over /ws (ws), socket.io's websocket transport
 * (websocket; --compression asks for permessage-deflate) or socket.io's long-polling (polling: it never polls
 * again). Meanwhile one normal client chats once a second. Prints the server's RSS before and its peak over
 * --seconds, per stalled client (--reading: the same clients reading all along, for comparison), the sockets closed as slow readers, and the normal client's chats, as a table
 * and one JSON line.
 */
import type { Socket } from 'node:net';
import WebSocket from 'ws';
import { connect } from '../src/client/client.js';
import { parseArgs, printTable, sleep, startChatwire, summarize } from './bench-support.js';
import { MiB, scrapeServer } from './load-support.js';

const args = parseArgs({ clients: '200', transport: 'ws', seconds: '6', 'token-delay-ms': '15', compression: 'false', reading: 'false' });
const CLIENTS = Number(args.clients);
const TRANSPORT = args.transport as 'ws' | 'websocket' | 'polling';
if (!['ws', 'websocket', 'polling'].includes(TRANSPORT)) throw new Error(`--transport must be ws, websocket or polling, got ${args.transport}`);
const SECONDS = Number(args.seconds);
const COMPRESSION = args.compression !== 'false';
// The same load with clients that keep reading: what the chats cost whoever reads them.
const READING = args.reading !== 'false';
const SYSTEM = 'You answer at length. '.repeat(200).slice(0, 4000);

function chats(i: number): Record<string, unknown>[] {
  return [
    { type: 'chat.send', id: 'a', text: `stalled reader ${i}: tell a long story`, params: { maxTokens: 4096 }, cache: 'bypass' },
    { type: 'chat.send', id: 'b', text: `stalled reader ${i}: and another one`, params: { maxTokens: 4096, system: SYSTEM }, cache: 'bypass' },
  ];
}

function tcpOf(ws: WebSocket): Socket {
  return (ws as unknown as { _socket: Socket })._socket;
}

/**
 * Opens a WebSocket, sends `start` once `ready` matches a frame, and stops reading at the first frame `stop` matches.
 * A raw `ws` socket, not chatwire's client: the point is a reader that stops reading its TCP socket mid-stream,
 * which a well-behaved client never does.
 */
function stallOver(
  url: string,
  ready: (frame: string) => boolean,
  start: (ws: WebSocket) => void,
  stop: (frame: string) => boolean,
  options: WebSocket.ClientOptions = {},
): Promise<WebSocket> {
  const ws = new WebSocket(url, options);
  return new Promise((resolve, reject) => {
    let started = false;
    ws.on('message', (data) => {
      const frame = data.toString();
      if (frame === '2') ws.send('3');
      if (!started && ready(frame)) {
        started = true;
        start(ws);
      } else if (started && stop(frame)) {
        if (!READING) tcpOf(ws).pause();
        resolve(ws);
      }
    });
    ws.once('error', reject);
  });
}

async function stalledWs(base: string, i: number): Promise<() => void> {
  const ws = await stallOver(
    `${base.replace(/^http/, 'ws')}/ws?user=stalled-${i}`,
    (f) => f.includes('"hello"'),
    (socket) => {
      for (const m of chats(i)) socket.send(JSON.stringify(m));
    },
    (f) => f.includes('"chat.ack"'),
  );
  return () => ws.terminate();
}

async function stalledSocketIO(base: string, i: number): Promise<() => void> {
  const ws = await stallOver(
    `${base.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`,
    (f) => f.startsWith('0{'),
    (socket) => {
      socket.send(`40${JSON.stringify({ user: `stalled-${i}` })}`);
      for (const [k, { type, ...payload }] of chats(i).entries()) socket.send(`42${k}${JSON.stringify([type, payload])}`);
    },
    (f) => f.startsWith('43'),
    { perMessageDeflate: COMPRESSION },
  );
  return () => ws.terminate();
}

/** socket.io over long-polling, spoken by hand: connect, send both chats, read one poll, and never poll again. */
async function stalledPolling(base: string, i: number): Promise<() => void> {
  const url = `${base}/socket.io/?EIO=4&transport=polling`;
  const open = await (await fetch(url)).text();
  const sid = (JSON.parse(open.slice(1)) as { sid: string }).sid;
  const at = `${url}&sid=${sid}`;
  const post = (body: string) => fetch(at, { method: 'POST', body, headers: { 'content-type': 'text/plain' } }).then((r) => r.text());
  await post(`40${JSON.stringify({ user: `stalled-${i}` })}`);
  for (let polls = 0; polls < 20; polls++) {
    const text = await (await fetch(at)).text();
    if (text.includes('40{')) break;
  }
  await post(
    chats(i)
      .map(({ type, ...payload }, k) => `42${k}${JSON.stringify([type, payload])}`)
      .join('\x1e'),
  );
  await (await fetch(at)).text();
  return () => {};
}

/** A client that reads (chatwire's client library): one short chat a second; the ack latencies and how many chats ended. */
async function normalClient(base: string, untilMs: number): Promise<{ acks: number[]; done: number; sent: number }> {
  const client = connect(`${base.replace(/^http/, 'ws')}/ws`, { user: 'normal', WebSocket, reconnect: false, heartbeatMs: 0 });
  await client.ready();
  const acks: number[] = [];
  let done = 0;
  let sent = 0;
  while (performance.now() < untilMs) {
    const id = `n${sent++}`;
    const sentAt = performance.now();
    client.chat.send(`a normal question ${id}`, { params: { maxTokens: 32 }, cache: 'bypass' }).then(
      (stream) => {
        acks.push(performance.now() - sentAt);
        stream.result.then(
          () => done++,
          () => {},
        );
      },
      () => {},
    );
    await sleep(1000);
  }
  await sleep(2000);
  client.close();
  return { acks, done, sent };
}

const server = await startChatwire({ CHATWIRE_DEV_TOKEN_DELAY_MS: args['token-delay-ms'] as string, CHATWIRE_MAX_CONNECTIONS_PER_USER: '16' });
const base = `http://127.0.0.1:${server.port}`;
const pid = server.child.pid as number;
try {
  await sleep(500);
  const before = await scrapeServer(server.port, pid);
  const open = { ws: stalledWs, websocket: stalledSocketIO, polling: stalledPolling }[TRANSPORT];
  const closers: (() => void)[] = [];
  for (let i = 0; i < CLIENTS; i += 50) {
    closers.push(...(await Promise.all(Array.from({ length: Math.min(50, CLIENTS - i) }, (_, k) => open(base, i + k)))));
  }
  // The clock starts once every stalled client has had its chats acknowledged and stopped reading.
  const untilMs = performance.now() + SECONDS * 1000;
  const normal = normalClient(base, untilMs);
  let peak = await scrapeServer(server.port, pid);
  while (performance.now() < untilMs) {
    await sleep(1000);
    const now = await scrapeServer(server.port, pid);
    if (now.rssBytes > peak.rssBytes) peak = now;
  }
  const reads = await normal;
  const after = await scrapeServer(server.port, pid);
  const bufferedBytes = Number(/^chatwire_buffered_bytes (\S+)$/m.exec(await (await fetch(`${base}/metrics`)).text())?.[1] ?? NaN);
  const growth = peak.rssBytes - before.rssBytes;
  const ack = summarize(reads.acks.slice().sort((a, b) => a - b));
  printTable(
    `${CLIENTS} ${READING ? 'reading clients' : 'stalled readers'} over ${TRANSPORT}${COMPRESSION ? ' (permessage-deflate)' : ''}, ${SECONDS} s`,
    ['figure', 'value'],
    [
      ['server RSS before (MiB)', (before.rssBytes / MiB).toFixed(1)],
      ['server RSS peak (MiB)', (peak.rssBytes / MiB).toFixed(1)],
      ['growth (MiB)', (growth / MiB).toFixed(1)],
      ['growth per stalled client (KiB)', (growth / CLIENTS / 1024).toFixed(0)],
      [
        'at the peak: V8 heap used / total / external (MiB)',
        `${(peak.heapUsedBytes / MiB).toFixed(1)} / ${(peak.heapTotalBytes / MiB).toFixed(1)} / ${(peak.externalBytes / MiB).toFixed(1)}`,
      ],
      ['buffered for slow readers at the end (KiB)', (bufferedBytes / 1024).toFixed(0)],
      ['sockets closed as slow readers', after.slowClientsClosed],
      ['normal client: chats sent / done', `${reads.sent} / ${reads.done}`],
      ['normal client: ack p50 / p99 (ms)', `${ack.p50.toFixed(1)} / ${ack.p99.toFixed(1)}`],
    ],
  );
  console.log(
    JSON.stringify({
      bench: 'stalled-readers',
      clients: CLIENTS,
      transport: TRANSPORT,
      compression: COMPRESSION,
      seconds: SECONDS,
      rssBeforeMiB: +(before.rssBytes / MiB).toFixed(1),
      rssPeakMiB: +(peak.rssBytes / MiB).toFixed(1),
      growthMiB: +(growth / MiB).toFixed(1),
      growthPerClientKiB: Math.round(growth / CLIENTS / 1024),
      peakHeapUsedMiB: +(peak.heapUsedBytes / MiB).toFixed(1),
      peakHeapTotalMiB: +(peak.heapTotalBytes / MiB).toFixed(1),
      peakExternalMiB: +(peak.externalBytes / MiB).toFixed(1),
      bufferedKiBAtEnd: Math.round(bufferedBytes / 1024),
      reading: READING,
      slowClientsClosed: after.slowClientsClosed,
      normal: { sent: reads.sent, done: reads.done, ackP50Ms: +ack.p50.toFixed(2), ackP99Ms: +ack.p99.toFixed(2) },
    }),
  );
  for (const close of closers) close();
} finally {
  await server.stop();
}
