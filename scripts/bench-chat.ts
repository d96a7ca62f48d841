/**
 * npm run bench:chat [-- --connections 100,1000 --seconds 8 --warmup 2]
 *
 * chatwire (dev provider, delay 0, in its own process) next to a minimal raw
 * uWebSockets.js echo server (also its own process), driven by the same
 * clients in this process, in the same run:
 * - ack latency p50/p99 next to the ping round trip p50/p99 on the same sockets under the same load;
 * - chat.delta frames delivered per second next to the echo server's messages per second;
 * - the same chat load over socket.io next to /ws;
 * - server RSS, and integrity: no connection dropped, no delta lost or repeated, one done per chat;
 * - the server process's CPU time (user + system) over the measured window per delta frame delivered, per transport.
 * Targets: ack p99 <= 2x ping p99; /ws deltas/s >= 50% of echo msgs/s; socket.io >= 70% of /ws;
 * socket.io's server CPU per frame <= 1.4x /ws's.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DIST, parseArgs, printTable, scrape, settle, sleep, startChatwire, startChild, summarize } from './bench-support.js';
import { openClients, socketIoConn, wsConn, type Conn, type Transport } from './load-support.js';

const args = parseArgs({ connections: '100,1000', seconds: '8', warmup: '2', 'ping-interval-ms': '100', window: '32' });
const CONNECTIONS = args.connections!.split(',').map(Number);
const SECONDS = Number(args.seconds);
const WARMUP = Number(args.warmup);
const PING_EVERY_MS = Number(args['ping-interval-ms']);
const ECHO_WINDOW = Number(args.window);

interface ChatRun {
  transport: Transport;
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
  /** The server process's user + system CPU time over the measured window, ms. */
  serverCpuMs: number;
}

/** User + system CPU time of a process, ms (Linux /proc; NaN elsewhere). */
function cpuMs(pid: number | undefined): number {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name, in clock ticks (100 Hz on Linux).
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
  } catch {
    return NaN;
  }
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

async function connect(transport: Transport, port: number, i: number): Promise<{ conn: Conn; loop: ChatLoop }> {
  let conn: Conn | undefined;
  const loop = new ChatLoop(i, (m) => conn?.send(m));
  const onFrame = (f: Frame) => loop.onFrame(f);
  conn = transport === 'ws' ? await wsConn(`ws://127.0.0.1:${port}/ws?user=bench-${i}`, onFrame) : await socketIoConn(`http://127.0.0.1:${port}`, `bench-${i}`, onFrame);
  return { conn, loop };
}

async function runChat(transport: Transport, connections: number): Promise<ChatRun> {
  const server = await startChatwire();
  try {
    const clients = await openClients(connections, (i) => connect(transport, server.port, i), { concurrency: 100 });
    for (const c of clients) c.loop.start();
    await sleep(WARMUP * 1000);
    for (const c of clients) c.loop.measuring = true;
    const t0 = performance.now();
    const cpu0 = cpuMs(server.child.pid);
    await sleep(SECONDS * 1000);
    const serverCpuMs = cpuMs(server.child.pid) - cpu0;
    const seconds = (performance.now() - t0) / 1000;
    for (const c of clients) {
      c.loop.measuring = false;
      c.loop.stop();
    }
    const rssMiB = (await scrape(server.port, 'process_resident_memory_bytes')) / 2 ** 20;
    // Let every chat in flight finish so integrity is checked on complete streams.
    const loops = clients.map((c) => c.loop);
    await settle(loops, 30_000);
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
      dropped: clients.filter((c) => !c.conn.open).length,
      errors,
      rssMiB,
      serverCpuMs,
    };
    for (const c of clients) c.conn.terminate();
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
    const frame = (t: number) => ({ type: 'chat.delta', taskId: 'task_0123456789abcdefghijkl', seq: 17, text: ' provider', t });
    const sockets = await openClients(
      connections,
      async () => {
        let conn: Conn | undefined;
        conn = await wsConn<{ t: number }>(`ws://127.0.0.1:${echo.port}/`, (m) => {
          if (measuring) {
            count++;
            if (count % 16 === 0) rtts.push(performance.now() - m.t);
          }
          conn?.send(frame(performance.now()));
        });
        return conn;
      },
      { concurrency: 100 },
    );
    for (const conn of sockets) for (let k = 0; k < ECHO_WINDOW; k++) conn.send(frame(performance.now()));
    await sleep(WARMUP * 1000);
    measuring = true;
    const t0 = performance.now();
    await sleep(SECONDS * 1000);
    measuring = false;
    const seconds = (performance.now() - t0) / 1000;
    const rss = Number(/VmRSS:\s+(\d+)/.exec(await import('node:fs').then((fs) => fs.readFileSync(`/proc/${echo.child.pid}/status`, 'utf8')))?.[1] ?? NaN) / 1024;
    for (const conn of sockets) conn.terminate();
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
  // What the server spends per delta frame it delivers: the cost of a transport that the clients' own decoding (on
  // the same cores) does not blur, as it does the frames/s ratio.
  const cpuPerFrameUs = (r: ChatRun) => Math.round(((r.serverCpuMs * 1000) / Math.max(1, r.deltas)) * 10) / 10;
  rows.push(['uWS echo (baseline)', connections, echo.perSecond, '-', '-', '-', echo.rtt.p50, echo.rtt.p99, '-', echo.rssMiB, '-', '-']);
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
      cpuPerFrameUs(r),
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
      socketioCpuPerFrameOverWs: +(cpuPerFrameUs(sio) / cpuPerFrameUs(ws)).toFixed(2),
    },
    serverCpuUsPerFrame: { ws: cpuPerFrameUs(ws), socketio: cpuPerFrameUs(sio) },
    loadAverage: os.loadavg().map((x) => Math.round(x * 10) / 10),
    targetsMet: {
      ackP99Within2xPing: ws.ack.p99 <= 2 * ws.ping.p99,
      deltasAtLeastHalfOfEcho: wsDeltaRate >= 0.5 * echo.perSecond,
      socketioAtLeast70PctOfWs: sioDeltaRate >= 0.7 * wsDeltaRate,
      socketioCpuPerFrameAtMost1_4xWs: cpuPerFrameUs(sio) <= 1.4 * cpuPerFrameUs(ws),
      noLossNoDrop: ws.lostDeltas + ws.unfinished + ws.dropped + sio.lostDeltas + sio.unfinished + sio.dropped === 0,
    },
  });
}
printTable(
  `bench:chat — dev provider, delay 0, ${SECONDS}s measured after ${WARMUP}s warm-up; echo window ${ECHO_WINDOW}/connection; latencies in ms`,
  ['server', 'conns', 'frames/s', 'chats/s', 'ack p50', 'ack p99', 'ping p50', 'ping p99', 'lost/unfinished/dropped', 'RSS MiB', 'server CPU µs/frame', 'errors'],
  rows,
);
for (const r of results) {
  const ratios = r.ratios as Record<string, number>;
  console.log(
    `${r.connections} conns: ack p99 / ping p99 = ${ratios.wsAckP99OverPingP99} (target <= 2); /ws deltas / echo = ${ratios.wsDeltasOverEcho} (target >= 0.5); socket.io / ws = ${ratios.socketioOverWs} (target >= 0.7); socket.io / ws server CPU per frame = ${ratios.socketioCpuPerFrameOverWs} (target <= 1.4); load average ${(r.loadAverage as number[]).join(' ')}`,
  );
}
console.log(JSON.stringify({ bench: 'chat', seconds: SECONDS, results }));
process.exit(0);
