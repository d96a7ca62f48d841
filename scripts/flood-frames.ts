/**
 * npm run bench:flood-frames -- [--seconds 10] [--baseline-seconds 5]
 *
 * One user flooding frames that are expensive to decode, against another user's chat acks. Starts chatwire as a
 * child process with its default limits (50 frames a second per user, 16 connections); a victim user sends a
 * short chat every 100 ms all along. Then, one after the other, the flooder sends as fast as it can: 64 KiB frames
 * of 32,000 nested arrays over 16 /ws connections; the same over 4 socket.io connections; flat frames just under
 * the size limit over 16 /ws connections. A closed connection reconnects at once (and is refused while its flood
 * penalty runs). The victim runs in a process of its own, so that the flooder's own stalls are not in its
 * figures. Prints, per phase, the victim's ack p50 / p99 and its ratio to the baseline, the server
 * process's CPU (all threads, % of one core), and the frames the flooder got out; as a table and one JSON line.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { connect } from '../src/client/client.js';
import { parseArgs, printTable, sleep, startChatwire, summarize } from './bench-support.js';

const args = parseArgs({ seconds: '10', 'baseline-seconds': '5', 'victim-of': '', 'victim-ms': '0' });
const SECONDS = Number(args.seconds);
const BASELINE_SECONDS = Number(args['baseline-seconds']);
const NESTED = '['.repeat(32_000) + ']'.repeat(32_000);
const WIDE = JSON.stringify({ type: 'ping', id: 'w', pad: 'x'.repeat(65_536 - 100) });

/** CPU seconds (user + system, all threads) the process has used, from /proc (Linux). */
function cpuSeconds(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function runVictim(base: string): { acks: { at: number; ms: number }[]; stop(): void } {
  const acks: { at: number; ms: number }[] = [];
  const client = connect(`${base.replace(/^http/, 'ws')}/ws`, { user: 'victim', WebSocket, reconnect: false, heartbeatMs: 0 });
  let n = 0;
  const timer = setInterval(() => {
    if (client.state !== 'open') return;
    const id = `v${n++}`;
    const sentAt = performance.now();
    client.chat.send(`victim ${id}`, { params: { maxTokens: 8 }, cache: 'bypass' }).then(
      () => acks.push({ at: performance.now(), ms: performance.now() - sentAt }),
      () => {},
    );
  }, 100);
  return {
    acks,
    stop() {
      clearInterval(timer);
      client.close();
    },
  };
}

/** The victim's ack latencies (ms) over the next `ms`, measured in a child process running this script with --victim-of. */
function victim(base: string, ms: number): Promise<number[]> {
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--victim-of', base, '--victim-ms', String(ms)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as number[]) : reject(new Error(`victim exited with ${code}`))));
  });
}

/**
 * One flooding connection that reconnects whenever it is closed or refused, until `until`. A raw `ws` socket, not
 * chatwire's client: it sends hostile frames (deep nesting, frames at the size limit) as fast as the socket takes them.
 */
async function floodConnection(url: string, frame: string, until: number, counts: { sent: number; closed: number }): Promise<void> {
  while (performance.now() < until) {
    const ws = new WebSocket(url);
    const ended = new Promise<void>((resolve) => {
      ws.once('close', () => resolve());
      ws.once('error', () => resolve());
    });
    const pump = () => {
      while (ws.readyState === WebSocket.OPEN && ws.bufferedAmount < 1024 * 1024 && performance.now() < until) {
        ws.send(frame);
        counts.sent++;
      }
      if (ws.readyState === WebSocket.OPEN && performance.now() < until) setTimeout(pump, 1);
      else if (ws.readyState === WebSocket.OPEN) ws.terminate();
    };
    let started = false;
    ws.on('message', (data) => {
      const text = data.toString();
      // The flood starts once the connection is the user's: hello on /ws, socket.io's CONNECT answered.
      if (text.startsWith('0{')) ws.send(`40${JSON.stringify({ user: 'flooder' })}`);
      else if (text === '2') ws.send('3');
      else if (!started && (text.startsWith('40') || text.includes('"hello"'))) {
        started = true;
        pump();
      }
    });
    await ended;
    counts.closed++;
  }
}

async function phase(name: string, base: string, pid: number, connections: number, path: string, frame: string): Promise<Record<string, unknown>> {
  const wsBase = base.replace(/^http/, 'ws');
  const url = path === 'ws' ? `${wsBase}/ws?user=flooder` : `${wsBase}/socket.io/?EIO=4&transport=websocket`;
  const counts = { sent: 0, closed: 0 };
  const from = performance.now();
  const cpu0 = cpuSeconds(pid);
  const until = from + SECONDS * 1000;
  const [latencies] = await Promise.all([
    victim(base, SECONDS * 1000),
    ...Array.from({ length: connections }, () => floodConnection(url, frame, until, counts)),
  ]);
  const cpu = ((cpuSeconds(pid) - cpu0) / ((performance.now() - from) / 1000)) * 100;
  const acks = summarize(latencies.sort((a, b) => a - b));
  // Let the server settle (and the flood penalty run out) before the next phase.
  await sleep(3000);
  return { name, acks, cpuPercent: cpu, framesSent: counts.sent, connectionsEnded: counts.closed };
}

if (args['victim-of'] !== '') {
  const v = runVictim(args['victim-of'] as string);
  await sleep(Number(args['victim-ms']));
  v.stop();
  process.stdout.write(JSON.stringify(v.acks.map((a) => a.ms)));
  process.exit(0);
}

const server = await startChatwire({
  CHATWIRE_DEV_TOKEN_DELAY_MS: '15',
  CHATWIRE_MESSAGES_PER_SECOND: '50',
  CHATWIRE_CHATS_PER_MINUTE: '100000',
  CHATWIRE_MAX_CONNECTIONS_PER_USER: '16',
});
const base = `http://127.0.0.1:${server.port}`;
const pid = server.child.pid as number;
try {
  await sleep(500);
  const cpu0 = cpuSeconds(pid);
  const from = performance.now();
  const alone = await victim(base, BASELINE_SECONDS * 1000);
  const baselineCpu = ((cpuSeconds(pid) - cpu0) / ((performance.now() - from) / 1000)) * 100;
  const baseline = summarize(alone.sort((a, b) => a - b));
  await sleep(500);
  const phases = [
    await phase('nested arrays, 16 /ws', base, pid, 16, 'ws', NESTED),
    await phase('nested arrays, 4 socket.io', base, pid, 4, 'socket.io', `42["ping",${NESTED}]`),
    await phase('flat near-limit, 16 /ws', base, pid, 16, 'ws', WIDE),
  ];
  const rows = [['baseline (victim alone)', baseline.p50.toFixed(2), baseline.p99.toFixed(2), '1.00', baselineCpu.toFixed(0), '-', '-']];
  for (const p of phases) {
    const a = p.acks as ReturnType<typeof summarize>;
    rows.push([
      p.name as string,
      a.p50.toFixed(2),
      a.p99.toFixed(2),
      (a.p50 / baseline.p50).toFixed(2),
      (p.cpuPercent as number).toFixed(0),
      String(p.framesSent),
      String(p.connectionsEnded),
    ]);
  }
  printTable(
    `one user flooding for ${SECONDS} s per phase; the victim chats every 100 ms`,
    ['phase', 'victim ack p50 (ms)', 'p99 (ms)', 'p50 / baseline', 'server CPU (% of a core)', 'frames sent', 'connections ended'],
    rows,
  );
  console.log(
    JSON.stringify({
      bench: 'flood-frames',
      seconds: SECONDS,
      baseline: { ackP50Ms: +baseline.p50.toFixed(2), ackP99Ms: +baseline.p99.toFixed(2), cpuPercent: Math.round(baselineCpu) },
      phases: phases.map((p) => {
        const a = p.acks as ReturnType<typeof summarize>;
        return {
          name: p.name,
          ackP50Ms: +a.p50.toFixed(2),
          ackP99Ms: +a.p99.toFixed(2),
          p50Ratio: +(a.p50 / baseline.p50).toFixed(2),
          cpuPercent: Math.round(p.cpuPercent as number),
          framesSent: p.framesSent,
          connectionsEnded: p.connectionsEnded,
        };
      }),
    }),
  );
} finally {
  await server.stop();
}
