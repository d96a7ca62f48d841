/**
 * npm run bench:chat [-- --connections 100,1000 --seconds 8 --warmup 2 --servers uws,node]
 *
 * chatwire (dev provider, delay 0, in its own process) next to a minimal raw
 * uWebSockets.js echo server (also its own process), driven by the same
 * clients in this process, in the same run:
 * - ack latency p50/p99 next to the ping round trip p50/p99 on the same sockets under the same load;
 * - chat.delta frames delivered per second next to the echo server's messages per second;
 * - the same chat load over socket.io next to /ws;
 * - the same clients and load against chatwire attached to a node:http server (createChatwire().attach(server): /ws
 *   over the `ws` package, socket.io on node:http), next to its own uWS app (listen, main.js);
 * - server RSS, and integrity: no connection dropped, no delta lost or repeated, one done per chat;
 * - the server process's CPU time (user + system) over the measured window per delta frame delivered, per transport.
 * Targets: ack p99 <= 2x ping p99; /ws deltas/s >= 50% of echo msgs/s; socket.io >= 70% of /ws;
 * socket.io's server CPU per frame <= 1.4x /ws's.
 */
import os from 'node:os';
import path from 'node:path';
import { CHATWIRE_PROGRAMS, DIST, parseArgs, printTable, processCpuMs, scrape, settle, sleep, startChatwire, startChild, summarize } from './bench-support.js';
import { ClosedChatLoop, openClients, socketIoConn, wsConn, type Conn, type LoopFrame, type Transport } from './load-support.js';

const args = parseArgs({ connections: '100,1000', seconds: '8', warmup: '2', 'ping-interval-ms': '100', window: '32', servers: 'uws,node' });
type ServerKind = keyof typeof CHATWIRE_PROGRAMS;
const SERVERS = args.servers!.split(',') as ServerKind[];
for (const s of SERVERS) if (!(s in CHATWIRE_PROGRAMS)) throw new Error(`--servers: ${s} is not one of ${Object.keys(CHATWIRE_PROGRAMS).join(', ')}`);
const SERVER_LABEL: Record<ServerKind, string> = { uws: 'uWS', node: 'node:http' };
const CONNECTIONS = args.connections!.split(',').map(Number);
const SECONDS = Number(args.seconds);
const WARMUP = Number(args.warmup);
const PING_EVERY_MS = Number(args['ping-interval-ms']);
const ECHO_WINDOW = Number(args.window);

interface ChatRun {
  server: ServerKind;
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

// The clients here are minimal on purpose, on both transports: this benchmark measures how many frames the server
// delivers, and the client process shares the server's two cores. The client library (src/client) runs under load
// in `npm run load`, bench:soak and the crash soak instead; here its own per-frame work would be measured too.
async function connect(transport: Transport, port: number, i: number): Promise<{ conn: Conn; loop: ClosedChatLoop }> {
  let conn: Conn | undefined;
  const loop = new ClosedChatLoop(i, (m) => conn?.send(m), PING_EVERY_MS);
  const onFrame = (f: LoopFrame) => loop.onFrame(f);
  conn =
    transport === 'ws'
      ? await wsConn(`ws://127.0.0.1:${port}/ws?user=bench-${i}`, onFrame)
      : await socketIoConn(`http://127.0.0.1:${port}`, `bench-${i}`, onFrame);
  return { conn, loop };
}

async function runChat(kind: ServerKind, transport: Transport, connections: number): Promise<ChatRun> {
  const server = await startChatwire({}, CHATWIRE_PROGRAMS[kind]);
  try {
    const clients = await openClients(connections, (i) => connect(transport, server.port, i), { concurrency: 100 });
    for (const c of clients) c.loop.start();
    await sleep(WARMUP * 1000);
    for (const c of clients) c.loop.measuring = true;
    const t0 = performance.now();
    const cpu0 = processCpuMs(server.child.pid);
    await sleep(SECONDS * 1000);
    const serverCpuMs = processCpuMs(server.child.pid) - cpu0;
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
      server: kind,
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
    const rss =
      Number(/VmRSS:\s+(\d+)/.exec(await import('node:fs').then((fs) => fs.readFileSync(`/proc/${echo.child.pid}/status`, 'utf8')))?.[1] ?? NaN) / 1024;
    for (const conn of sockets) conn.terminate();
    return { connections, perSecond: count / seconds, rtt: summarize(rtts), rssMiB: rss };
  } finally {
    await echo.stop();
  }
}

const results: Record<string, unknown>[] = [];
const rows: (string | number)[][] = [];

function transportResult(r: ChatRun): Record<string, unknown> {
  return {
    deltasPerSec: Math.round(r.deltas / r.seconds),
    chatsPerSec: Math.round(r.chats / r.seconds),
    tokensPerSec: Math.round(r.tokens / r.seconds),
    ackMs: r.ack,
    pingMs: r.ping,
    lostDeltas: r.lostDeltas,
    unfinished: r.unfinished,
    dropped: r.dropped,
    errors: r.errors,
    rssMiB: Math.round(r.rssMiB),
  };
}

for (const connections of CONNECTIONS) {
  const echo = await runEcho(connections);
  // What the server spends per delta frame it delivers: the cost of a transport that the clients' own decoding (on
  // the same cores) does not blur, as it does the frames/s ratio.
  const cpuPerFrameUs = (r: ChatRun) => Math.round(((r.serverCpuMs * 1000) / Math.max(1, r.deltas)) * 10) / 10;
  rows.push(['uWS echo (baseline)', connections, echo.perSecond, '-', '-', '-', echo.rtt.p50, echo.rtt.p99, '-', echo.rssMiB, '-', '-']);
  const byServer: Partial<Record<ServerKind, { ws: ChatRun; sio: ChatRun }>> = {};
  for (const kind of SERVERS) {
    const ws = await runChat(kind, 'ws', connections);
    const sio = await runChat(kind, 'socket.io', connections);
    byServer[kind] = { ws, sio };
    for (const r of [ws, sio]) {
      rows.push([
        `chatwire ${r.transport} (${SERVER_LABEL[kind]})`,
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
        Object.entries(r.errors)
          .map(([k, v]) => `${k}:${v}`)
          .join(' ') || 'none',
      ]);
    }
  }
  const result: Record<string, unknown> = {
    connections,
    echoMsgsPerSec: Math.round(echo.perSecond),
    echoRttMs: echo.rtt,
    loadAverage: os.loadavg().map((x) => Math.round(x * 10) / 10),
  };
  const uws = byServer.uws;
  if (uws) {
    const wsDeltaRate = uws.ws.deltas / uws.ws.seconds;
    const sioDeltaRate = uws.sio.deltas / uws.sio.seconds;
    Object.assign(result, {
      ws: transportResult(uws.ws),
      socketio: transportResult(uws.sio),
      ratios: {
        wsAckP99OverPingP99: +(uws.ws.ack.p99 / uws.ws.ping.p99).toFixed(2),
        wsDeltasOverEcho: +(wsDeltaRate / echo.perSecond).toFixed(2),
        socketioOverWs: +(sioDeltaRate / wsDeltaRate).toFixed(2),
        socketioCpuPerFrameOverWs: +(cpuPerFrameUs(uws.sio) / cpuPerFrameUs(uws.ws)).toFixed(2),
      },
      serverCpuUsPerFrame: { ws: cpuPerFrameUs(uws.ws), socketio: cpuPerFrameUs(uws.sio) },
      targetsMet: {
        ackP99Within2xPing: uws.ws.ack.p99 <= 2 * uws.ws.ping.p99,
        deltasAtLeastHalfOfEcho: wsDeltaRate >= 0.5 * echo.perSecond,
        socketioAtLeast70PctOfWs: sioDeltaRate >= 0.7 * wsDeltaRate,
        socketioCpuPerFrameAtMost1_4xWs: cpuPerFrameUs(uws.sio) <= 1.4 * cpuPerFrameUs(uws.ws),
        noLossNoDrop: uws.ws.lostDeltas + uws.ws.unfinished + uws.ws.dropped + uws.sio.lostDeltas + uws.sio.unfinished + uws.sio.dropped === 0,
      },
    });
  }
  const node = byServer.node;
  if (node) {
    result.nodeHttp = {
      ws: transportResult(node.ws),
      socketio: transportResult(node.sio),
      serverCpuUsPerFrame: { ws: cpuPerFrameUs(node.ws), socketio: cpuPerFrameUs(node.sio) },
    };
    if (uws) {
      result.nodeOverUws = {
        ws: +(node.ws.deltas / node.ws.seconds / (uws.ws.deltas / uws.ws.seconds)).toFixed(2),
        socketio: +(node.sio.deltas / node.sio.seconds / (uws.sio.deltas / uws.sio.seconds)).toFixed(2),
      };
    }
  }
  results.push(result);
}
printTable(
  `bench:chat — dev provider, delay 0, ${SECONDS}s measured after ${WARMUP}s warm-up; echo window ${ECHO_WINDOW}/connection; latencies in ms`,
  [
    'server',
    'conns',
    'frames/s',
    'chats/s',
    'ack p50',
    'ack p99',
    'ping p50',
    'ping p99',
    'lost/unfinished/dropped',
    'RSS MiB',
    'server CPU µs/frame',
    'errors',
  ],
  rows,
);
for (const r of results) {
  const ratios = r.ratios as Record<string, number> | undefined;
  if (ratios)
    console.log(
      `${r.connections} conns: ack p99 / ping p99 = ${ratios.wsAckP99OverPingP99} (target <= 2); /ws deltas / echo = ${ratios.wsDeltasOverEcho} (target >= 0.5); socket.io / ws = ${ratios.socketioOverWs} (target >= 0.7); socket.io / ws server CPU per frame = ${ratios.socketioCpuPerFrameOverWs} (target <= 1.4); load average ${(r.loadAverage as number[]).join(' ')}`,
    );
  const nodeOverUws = r.nodeOverUws as Record<string, number> | undefined;
  if (nodeOverUws) console.log(`${r.connections} conns: node:http / uWS deltas per second: /ws ${nodeOverUws.ws}, socket.io ${nodeOverUws.socketio}`);
}
console.log(JSON.stringify({ bench: 'chat', seconds: SECONDS, results }));
process.exit(0);
