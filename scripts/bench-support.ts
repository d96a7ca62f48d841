/**
 * Shared pieces of the benchmarks: starting chatwire (and baselines) as child
 * processes on loopback, percentiles, and the table + JSON line every bench prints.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export interface Child {
  child: ChildProcess;
  port: number;
  stop(): Promise<void>;
}

/** Starts `node <script>` and resolves with the port it prints as `"port":N` (chatwire's start log) or `port=N`. */
export function startChild(script: string, env: Record<string, string>, name = path.basename(script)): Promise<Child> {
  const child = spawn(process.execPath, [script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  return new Promise((resolve, reject) => {
    const onData = (c: Buffer) => {
      out += c.toString();
      const m = /"port":(\d+)|port=(\d+)/.exec(out);
      if (!m) return;
      child.stdout?.off('data', onData);
      child.stdout?.resume();
      resolve({
        child,
        port: Number(m[1] ?? m[2]),
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null) return done();
            child.once('exit', () => done());
            child.kill('SIGTERM');
            setTimeout(() => child.kill('SIGKILL'), 10_000).unref();
          }),
      });
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', (c: Buffer) => (out += c.toString()));
    child.once('exit', (code) => reject(new Error(`${name} exited with ${code} before listening:\n${out.slice(-2000)}`)));
  });
}

/** The program a benchmark starts chatwire with: main.js (its own uWS app), or bench-node-server.js (attached to a node:http server). */
export const CHATWIRE_PROGRAMS = { uws: path.join(DIST, 'src', 'main.js'), node: path.join(DIST, 'scripts', 'bench-node-server.js') } as const;

/** chatwire (main.js) on 127.0.0.1:0 in `dataDir`, limits raised so they do not shape the load; `env` adds to or overrides its settings. */
/** User + system CPU time of a process, all its threads, in ms (Linux /proc, in clock ticks of 10 ms; NaN elsewhere). */
export function processCpuMs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after "(comm) ": state is field 3, utime and stime are fields 14 and 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return NaN;
  }
}

/** A benchmark's chatwire settings: limits raised so that they do not shape the load. */
export const UNLIMITED_ENV: Readonly<Record<string, string>> = {
  CHATWIRE_MESSAGES_PER_SECOND: '1000000',
  CHATWIRE_CHATS_PER_MINUTE: '1000000',
  CHATWIRE_MODEL_TOKENS_PER_MINUTE: '1000000000',
  CHATWIRE_MAX_CONNECTIONS_PER_USER: '100000',
  // Every client of a benchmark comes from 127.0.0.1, hundreds of socket.io handshakes at once.
  CHATWIRE_MAX_PENDING_CONNECTIONS: '1000000',
  CHATWIRE_MAX_PENDING_PER_ADDRESS: '1000000',
  CHATWIRE_MAX_RUNNING_PER_USER: '100000',
  CHATWIRE_MAX_QUEUE: '100000',
  // info: the start line carries the port.
  LOG_LEVEL: 'info',
};

export function startChatwireIn(dataDir: string, env: Record<string, string>, program: string = CHATWIRE_PROGRAMS.uws): Promise<Child> {
  return startChild(program, { PORT: '0', HOST: '127.0.0.1', CHATWIRE_DATA_DIR: dataDir, ...UNLIMITED_ENV, ...env });
}

/** chatwire with the dev provider on a fresh temp data dir, limits raised so they do not shape the load. */
export async function startChatwire(env: Record<string, string> = {}, program: string = CHATWIRE_PROGRAMS.uws): Promise<Child & { dataDir: string }> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-bench-'));
  const server = await startChatwireIn(dataDir, { CHATWIRE_DEV_TOKEN_DELAY_MS: '0', ...env }, program);
  return {
    ...server,
    dataDir,
    stop: async () => {
      await server.stop();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}

export function summarize(samples: number[]): { n: number; p50: number; p99: number; p999: number } {
  const s = [...samples].sort((a, b) => a - b);
  return { n: s.length, p50: percentile(s, 50), p99: percentile(s, 99), p999: percentile(s, 99.9) };
}

/** Reads one gauge or counter value from a Prometheus text page. */
export async function scrape(port: number, metric: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${metric} `) || l.startsWith(`${metric}{`));
  return line ? Number(line.split(' ').at(-1)) : NaN;
}

export function printTable(title: string, header: string[], rows: (string | number)[][]): void {
  const cells = [header, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? fmt(c) : c)))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => String(r[i] ?? '').length)));
  console.log(`\n${title}`);
  for (const [i, row] of cells.entries()) {
    console.log(`| ${row.map((c, k) => String(c ?? '').padEnd(widths[k] as number)).join(' | ')} |`);
    if (i === 0) console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  }
}

export function fmt(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (Math.abs(n) >= 100) return String(Math.round(n));
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

export function parseArgs(defaults: Record<string, string>): Record<string, string> {
  const out = { ...defaults };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (!a.startsWith('--')) continue;
    const key = a.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) out[key] = 'true';
    else {
      out[key] = next;
      i++;
    }
  }
  return out;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until no client has a chat in flight, or `ms` has passed; resolves with the chats still in flight. */
export async function settle(clients: readonly { readonly inFlight: number }[], ms: number): Promise<number> {
  const until = performance.now() + ms;
  while (clients.some((c) => c.inFlight > 0) && performance.now() < until) await sleep(100);
  return clients.reduce((n, c) => n + c.inFlight, 0);
}

/** One case of bench:db's lookups (SQLite or PostgreSQL), as its table prints it. */
export interface LookupResult {
  lookup: string;
  limit: number;
  impl: string;
  queriesPerCall: number;
  p50Ms: number;
  p99Ms: number;
  callsPerSec: number;
}

/** bench:db's lookup table, the same for both engines: the first three columns left-aligned, the figures right-aligned. */
export function lookupTable<R extends LookupResult>(results: R[], speedup: (r: R) => { p50: number; throughput: number }): string {
  const header = ['lookup', 'limit', 'implementation', 'queries/call', 'p50 ms', 'p99 ms', 'calls/s', 'speed-up p50', 'speed-up calls/s'];
  const rows = results.map((r) => [
    r.lookup,
    String(r.limit),
    r.impl,
    r.queriesPerCall.toFixed(2),
    r.p50Ms.toFixed(3),
    r.p99Ms.toFixed(3),
    String(r.callsPerSec),
    `${speedup(r).p50.toFixed(2)}x`,
    `${speedup(r).throughput.toFixed(2)}x`,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) => cells.map((cell, i) => (i < 3 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ');
  return `${line(header)}\n${widths.map((w) => '-'.repeat(w)).join('  ')}\n${rows.map(line).join('\n')}\n\n`;
}
