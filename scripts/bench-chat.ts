/**
 * npm run bench:chat [-- --connections 100,1000 --seconds 8 --warmup 2]
 *
 * chatwire (dev provider, delay 0, in its own process) next to a minimal raw
 * uWebSockets.js echo server (also its own process), driven by the same
 * clients in this process, in the same run:
 * - ack latency p50/p99 next to the ping round trip p50/p99 on the same sockets under the same load;
 * - chat.delta frames delivered per second next to the echo server's messages per second;
 * - the same chat load over socket.io next to /ws;
 * - server RSS, and integrity: no connection dropped, no delta lost or repeated, one done per chat.
 * Targets: ack p99 <= 2x ping p99; /ws deltas/s >= 50% of echo msgs/s; socket.io >= 70% of /ws.
 */
import path from 'node:path';
import { io as ioClient, type Socket } from 'socket.io-client';
import WebSocket from 'ws';
import { DIST, parseArgs, printTable, scrape, sleep, startChatwire, startChild, summarize } from './bench-support.js';

const args = parseArgs({ connections: '100,1000', seconds: '8', warmup: '2', 'ping-interval-ms': '100', window: '32' });
const CONNECTIONS = args.connections!.split(',').map(Number);
const SECONDS = Number(args.seconds);
const WARMUP = Number(args.warmup);
const PING_EVERY_MS = Number(args['ping-interval-ms']);
const ECHO_WINDOW = Number(args.window);

interface ChatRun {
  transport: 'ws' | 'socket.io';
  connections: number;
  chats: number;
  deltas: number;
  tokens: number;
  seconds: number;
  ack: ReturnType<typeof summarize>;
  ping: ReturnType<typeof summarize>;
  lostDeltas: number;
  unfinished: number;
  dropped: number;
  errors: Record<string, number>;
  rssMiB: number;
}

type Frame = { type: string; id?: string; taskId?: string; seq?: number; text?: string; code?: string; usage?: { completionTokens: number } };

/** One client's chat loop, transport-agnostic. */
class ChatLoop {
  measuring = false;
  stopping = false;
  readonly acks: number[] = [];
  readonly pings: number[] = [];
  chats = 0;
  deltas = 0;
  tokens = 0;
  lost = 0;
  inFlight = 0;
  readonly errors: Record<string, number> = {};
  private nextSeq = new Map<string, number>();
  private pending = new Map<string, number>();
  private n = 0;
  private pingTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly id: number,
    private readonly sendRaw: (m: Record<string, unknown>) => void,
  ) {}

  start(): void {
    this.sendChat();
    this.pingTimer = setInterval(() => {
      const id = `p${this.n++}`;
      this.pending.set(id, performance.now());
      this.sendRaw({ type: 'ping', id });
    }, PING_EVERY_MS);
  }

  private sendChat(): void {
    if (this.stopping) return;
    const id = `c${this.n++}`;
    this.pending.set(id, performance.now());
    this.inFlight++;
    this.sendRaw({ type: 'chat.send', id, text: `client ${this.id} asks question ${this.n}`, cache: 'bypass' });
  }

  onFrame(m: Frame): void {
    switch (m.type) {
      case 'pong': {
        const t = this.pending.get(m.id as string);
        this.pending.delete(m.id as string);
        if (t !== undefined && this.measuring) this.pings.push(performance.now() - t);
        break;
      }
      case 'chat.ack': {
        const t = this.pending.get(m.id as string);
        this.pending.delete(m.id as string);
        if (t !== undefined && this.measuring) this.acks.push(performance.now() - t);
        this.nextSeq.set(m.taskId as string, 0);
        break;
      }
      case 'chat.delta': {
        const expected = this.nextSeq.get(m.taskId as string) ?? 0;
        if (m.seq !== expected) this.lost++;
        this.nextSeq.set(m.taskId as string, (m.seq as number) + 1);
        if (this.measuring) this.deltas++;
        break;
      }
      case 'chat.done':
        this.nextSeq.delete(m.taskId as string);
        this.inFlight--;
        if (this.measuring) {
          this.chats++;
          this.tokens += m.usage?.completionTokens ?? 0;
        }
        this.sendChat();
        break;
      case 'chat.error':
      case 'error':
        this.errors[m.code as string] = (this.errors[m.code as string] ?? 0) + 1;
        if (m.type === 'chat.error' || (m.id ?? '').startsWith('c')) {
          this.inFlight--;
          setTimeout(() => this.sendChat(), 50);
        }
        break;
    }
  }

  stop(): void {
    this.stopping = true;
    clearInterval(this.pingTimer);
  }
}

async function connectWs(port: number, i: number): Promise<{ ws: WebSocket; loop: ChatLoop; closed: () => boolean }> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?user=bench-${i}`);
  let isClosed = false;
  const loop = new ChatLoop(i, (m) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(m)));
  ws.on('message', (data) => loop.onFrame(JSON.parse(data.toString()) as Frame));
  ws.on('close', () => (isClosed = true));
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  return { ws, loop, closed: () => isClosed };
}

async function connectSio(port: number, i: number): Promise<{ socket: Socket; loop: ChatLoop; closed: () => boolean }> {
  const socket = ioClient(`http://127.0.0.1:${port}`, { transports: ['websocket'], auth: { user: `bench-${i}` }, reconnection: false, forceNew: true });
  let isClosed = false;
  // Replies go through the ack callback, server-initiated frames arrive as events named by their type.
  const loop: ChatLoop = new ChatLoop(i, (m) => {
    const { type, ...payload } = m;
    socket.emit(type as string, payload, (reply: Frame) => loop.onFrame(reply));
  });
  socket.onAny((event: string, payload: Frame) => loop.onFrame({ ...payload, type: event }));
  socket.on('disconnect', () => (isClosed = true));
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('connect_error', reject);
  });
  return { socket, loop, closed: () => isClosed };
}

async function inBatches<T>(count: number, make: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < count; i += 100) out.push(...(await Promise.all(Array.from({ length: Math.min(100, count - i) }, (_, k) => make(i + k)))));
  return out;
}

async function runChat(transport: 'ws' | 'socket.io', connections: number): Promise<ChatRun> {
  const server = await startChatwire();
  try {
    const clients = transport === 'ws' ? await inBatches(connections, (i) => connectWs(server.port, i)) : await inBatches(connections, (i) => connectSio(server.port, i));
    for (const c of clients) c.loop.start();
    await sleep(WARMUP * 1000);
    for (const c of clients) c.loop.measuring = true;
    const t0 = performance.now();
    await sleep(SECONDS * 1000);
    const seconds = (performance.now() - t0) / 1000;
    for (const c of clients) {
      c.loop.measuring = false;
      c.loop.stop();
    }
    const rssMiB = (await scrape(server.port, 'chatwire_process_process_resident_memory_bytes')) / 2 ** 20;
    // Let every chat in flight finish so integrity is checked on complete streams.
    const deadline = Date.now() + 30_000;
    while (clients.some((c) => c.loop.inFlight > 0) && Date.now() < deadline) await sleep(100);
    const loops = clients.map((c) => c.loop);
    const errors: Record<string, number> = {};
    for (const l of loops) for (const [k, v] of Object.entries(l.errors)) errors[k] = (errors[k] ?? 0) + v;
    const run: ChatRun = {
      transport,
      connections,
      chats: loops.reduce((n, l) => n + l.chats, 0),
      deltas: loops.reduce((n, l) => n + l.deltas, 0),
      tokens: loops.reduce((n, l) => n + l.tokens, 0),
      seconds,
      ack: summarize(loops.flatMap((l) => l.acks)),
      ping: summarize(loops.flatMap((l) => l.pings)),
      lostDeltas: loops.reduce((n, l) => n + l.lost, 0),
      unfinished: loops.reduce((n, l) => n + Math.max(0, l.inFlight), 0),
      dropped: clients.filter((c) => c.closed()).length,
      errors,
      rssMiB,
    };
    for (const c of clients) {
      if ('ws' in c) c.ws.close();
      else c.socket.close();
    }
    return run;
  } finally {
    await server.stop();
  }
}

async function runEcho(connections: number): Promise<{ connections: number; perSecond: number; rtt: ReturnType<typeof summarize>; rssMiB: number }> {
  const echo = await startChild(path.join(DIST, 'scripts', 'bench-echo-server.js'), {});
  try {
    let measuring = false;
    let count = 0;
    const rtts: number[] = [];
    // A delta-sized JSON frame, kept `window` at a time in flight per connection (one chat's worth of tokens).
    const payload = (t: number) => JSON.stringify({ type: 'chat.delta', taskId: 'task_0123456789abcdefghijkl', seq: 17, text: ' provider', t });
    const sockets = await inBatches(connections, async () => {
      const ws = new WebSocket(`ws://127.0.0.1:${echo.port}/`);
      await new Promise<void>((resolve, reject) => {
        ws.once('open', () => resolve());
        ws.once('error', reject);
      });
      ws.on('message', (data) => {
        const m = JSON.parse(data.toString()) as { t: number };
        if (measuring) {
          count++;
          if (count % 16 === 0) rtts.push(performance.now() - m.t);
        }
        if (ws.readyState === WebSocket.OPEN) ws.send(payload(performance.now()));
      });
      return ws;
    });
    for (const ws of sockets) for (let k = 0; k < ECHO_WINDOW; k++) ws.send(payload(performance.now()));
    await sleep(WARMUP * 1000);
    measuring = true;
    const t0 = performance.now();
    await sleep(SECONDS * 1000);
    measuring = false;
    const seconds = (performance.now() - t0) / 1000;
    const rss = Number(/VmRSS:\s+(\d+)/.exec(await import('node:fs').then((fs) => fs.readFileSync(`/proc/${echo.child.pid}/status`, 'utf8')))?.[1] ?? NaN) / 1024;
    for (const ws of sockets) ws.terminate();
    return { connections, perSecond: count / seconds, rtt: summarize(rtts), rssMiB: rss };
  } finally {
    await echo.stop();
  }
}

const results: Record<string, unknown>[] = [];
const rows: (string | number)[][] = [];
for (const connections of CONNECTIONS) {
  const echo = await runEcho(connections);
  const ws = await runChat('ws', connections);
  const sio = await runChat('socket.io', connections);
  const wsDeltaRate = ws.deltas / ws.seconds;
  const sioDeltaRate = sio.deltas / sio.seconds;
  rows.push(['uWS echo (baseline)', connections, echo.perSecond, '-', '-', '-', echo.rtt.p50, echo.rtt.p99, '-', echo.rssMiB, '-']);
  for (const r of [ws, sio]) {
    rows.push([
      `chatwire ${r.transport}`,
      connections,
      r.deltas / r.seconds,
      r.chats / r.seconds,
      r.ack.p50,
      r.ack.p99,
      r.ping.p50,
      r.ping.p99,
      `${r.lostDeltas}/${r.unfinished}/${r.dropped}`,
      r.rssMiB,
      Object.entries(r.errors).map(([k, v]) => `${k}:${v}`).join(' ') || 'none',
    ]);
  }
  results.push({
    connections,
    echoMsgsPerSec: Math.round(echo.perSecond),
    echoRttMs: echo.rtt,
    ws: { deltasPerSec: Math.round(wsDeltaRate), chatsPerSec: Math.round(ws.chats / ws.seconds), tokensPerSec: Math.round(ws.tokens / ws.seconds), ackMs: ws.ack, pingMs: ws.ping, lostDeltas: ws.lostDeltas, unfinished: ws.unfinished, dropped: ws.dropped, errors: ws.errors, rssMiB: Math.round(ws.rssMiB) },
    socketio: { deltasPerSec: Math.round(sioDeltaRate), chatsPerSec: Math.round(sio.chats / sio.seconds), ackMs: sio.ack, pingMs: sio.ping, lostDeltas: sio.lostDeltas, unfinished: sio.unfinished, dropped: sio.dropped, errors: sio.errors, rssMiB: Math.round(sio.rssMiB) },
    ratios: {
      wsAckP99OverPingP99: +(ws.ack.p99 / ws.ping.p99).toFixed(2),
      wsDeltasOverEcho: +(wsDeltaRate / echo.perSecond).toFixed(2),
      socketioOverWs: +(sioDeltaRate / wsDeltaRate).toFixed(2),
    },
    targetsMet: {
      ackP99Within2xPing: ws.ack.p99 <= 2 * ws.ping.p99,
      deltasAtLeastHalfOfEcho: wsDeltaRate >= 0.5 * echo.perSecond,
      socketioAtLeast70PctOfWs: sioDeltaRate >= 0.7 * wsDeltaRate,
      noLossNoDrop: ws.lostDeltas + ws.unfinished + ws.dropped + sio.lostDeltas + sio.unfinished + sio.dropped === 0,
    },
  });
}
printTable(
  `bench:chat — dev provider, delay 0, ${SECONDS}s measured after ${WARMUP}s warm-up; echo window ${ECHO_WINDOW}/connection; latencies in ms`,
  ['server', 'conns', 'frames/s', 'chats/s', 'ack p50', 'ack p99', 'ping p50', 'ping p99', 'lost/unfinished/dropped', 'RSS MiB', 'errors'],
  rows,
);
for (const r of results) {
  const ratios = r.ratios as Record<string, number>;
  console.log(`${r.connections} conns: ack p99 / ping p99 = ${ratios.wsAckP99OverPingP99} (target <= 2); /ws deltas / echo = ${ratios.wsDeltasOverEcho} (target >= 0.5); socket.io / ws = ${ratios.socketioOverWs} (target >= 0.7)`);
}
console.log(JSON.stringify({ bench: 'chat', seconds: SECONDS, results }));
process.exit(0);
