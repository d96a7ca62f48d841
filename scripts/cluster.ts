/**
 * Runs a chatwire cluster on this machine: N nodes in cluster mode on
 * consecutive ports, against one PostgreSQL database (created if missing) and
 * one Redis, each node with its own data dir (its first-level reply cache).
 * Prints the nodes' URLs; Ctrl-C (or SIGTERM) stops them all, each with its
 * graceful shutdown. A node that exits is reported; the others keep running.
 *
 * Usage: npm run cluster -- [--nodes 3] [--port 8080] [--database-url postgres://...] [--redis-url redis://...]
 *                            [--data-dir ./data/cluster]
 *
 * The database and Redis default to CHATWIRE_DATABASE_URL and CHATWIRE_REDIS_URL, else the local
 * postgres://postgres@127.0.0.1:5432/chatwire and redis://127.0.0.1:6379. Other CHATWIRE_* settings in the
 * environment reach every node.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createDatabaseIfMissing } from '../src/db/pg.js';
import { fail, parseCommandLine } from './command-line.js';

const USAGE = 'usage: npm run cluster -- [--nodes N] [--port FIRST_PORT] [--database-url postgres://...] [--redis-url redis://...] [--data-dir DIR]';
const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'src', 'main.js');

const args = parseCommandLine(USAGE, {
  nodes: { type: 'string', default: '3' },
  port: { type: 'string', default: '8080' },
  'database-url': { type: 'string' },
  'redis-url': { type: 'string' },
  'data-dir': { type: 'string', default: path.join('data', 'cluster') },
});
const nodes = Number(args.nodes);
const firstPort = Number(args.port);
if (!Number.isInteger(nodes) || nodes < 1 || nodes > 64) fail(`--nodes must be a whole number from 1 to 64\n${USAGE}`);
if (!Number.isInteger(firstPort) || firstPort < 1 || firstPort + nodes - 1 > 65535) fail(`--port must leave room for ${nodes} ports below 65536\n${USAGE}`);
const databaseUrl = args['database-url'] ?? process.env.CHATWIRE_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/chatwire';
const redisUrl = args['redis-url'] ?? process.env.CHATWIRE_REDIS_URL ?? 'redis://127.0.0.1:6379';
const dataDir = path.resolve(args['data-dir']);

try {
  if (await createDatabaseIfMissing(databaseUrl)) process.stdout.write(`created database ${new URL(databaseUrl).pathname.slice(1)}\n`);
} catch (err) {
  fail(`PostgreSQL at ${databaseUrl} is not usable: ${(err as Error).message}`, 1);
}

interface Node {
  index: number;
  port: number;
  child: ChildProcess;
  exited: Promise<void>;
}

function startNode(index: number): Node {
  const port = firstPort + index;
  const child = spawn(process.execPath, [MAIN], {
    env: {
      ...process.env,
      PORT: String(port),
      CHATWIRE_DATABASE_URL: databaseUrl,
      CHATWIRE_REDIS_URL: redisUrl,
      CHATWIRE_DATA_DIR: path.join(dataDir, `node-${index + 1}`),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const tag = `[node ${index + 1}] `;
  for (const stream of [child.stdout, child.stderr]) {
    let rest = '';
    stream?.on('data', (chunk: Buffer) => {
      const lines = (rest + chunk.toString()).split('\n');
      rest = lines.pop() ?? '';
      for (const line of lines) process.stdout.write(`${tag}${line}\n`);
    });
  }
  const exited = new Promise<void>((resolve) =>
    child.once('exit', (code, signal) => {
      if (!stopping) process.stdout.write(`${tag}exited (${signal ?? `code ${code}`}); the other nodes keep running\n`);
      resolve();
    }),
  );
  return { index, port, child, exited };
}

let stopping = false;
const running = Array.from({ length: nodes }, (_, i) => startNode(i));

async function stopAll(): Promise<void> {
  if (stopping) return;
  stopping = true;
  for (const node of running) if (node.child.exitCode === null && node.child.signalCode === null) node.child.kill('SIGTERM');
  await Promise.all(running.map((n) => n.exited));
  process.exit(0);
}
process.on('SIGINT', () => void stopAll());
process.on('SIGTERM', () => void stopAll());

process.stdout.write(
  [
    `chatwire cluster: ${nodes} node${nodes === 1 ? '' : 's'} on PostgreSQL ${redactUrl(databaseUrl)} and Redis ${redactUrl(redisUrl)}`,
    ...running.map((n) => `  node ${n.index + 1}: http://127.0.0.1:${n.port}  ws://127.0.0.1:${n.port}/ws`),
    'Ctrl-C stops them all.',
    '',
  ].join('\n'),
);
await Promise.all(running.map((n) => n.exited));
if (!stopping) process.exit(1);

function redactUrl(url: string): string {
  const u = new URL(url);
  if (u.password) u.password = '***';
  return u.toString();
}
