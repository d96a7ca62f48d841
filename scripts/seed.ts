/**
 * Fills the data dir with a deterministic marketplace data set (migrating first).
 * Usage: npm run seed -- [--consumers N] [--providers N] [--requests N] [--seed S] [--data-dir <dir>]
 * Defaults: 100,000 requests, one consumer per 10 requests, one provider per 50.
 * The data dir is --data-dir, else CHATWIRE_DATA_DIR (read through loadConfig, default ./data).
 * Prints progress on stderr and one JSON line with the counts and the time on stdout.
 */
import path from 'node:path';
import { Database } from '../src/db/database.js';
import { seedMarketplace, SeedTargetNotEmptyError } from '../src/db/marketplace-seed.js';
import { migrate, MigrationError } from '../src/db/migrate.js';
import { databaseFileOf, fail, lockOrFail, parseCommandLine } from './command-line.js';

const usage = 'usage: npm run seed -- [--consumers N] [--providers N] [--requests N] [--seed S] [--data-dir <dir>]';

const values = parseCommandLine(usage, {
  consumers: { type: 'string' },
  providers: { type: 'string' },
  requests: { type: 'string', default: '100000' },
  seed: { type: 'string', default: '1' },
  'data-dir': { type: 'string' },
});

function count(name: string, raw: string, min: number): number {
  const n = Number(raw.replaceAll('_', ''));
  if (!Number.isSafeInteger(n) || n < min) fail(`--${name} must be an integer >= ${min}, got ${raw}\n${usage}`);
  return n;
}
const requests = count('requests', values.requests, 0);
const consumers = count('consumers', values.consumers ?? String(Math.max(1, Math.ceil(requests / 10))), 1);
const providers = count('providers', values.providers ?? String(Math.max(1, Math.ceil(requests / 50))), 1);
const seed = count('seed', values.seed, 0);

const file = databaseFileOf(values['data-dir']);
// The seed's one transaction holds SQLite's write lock for its whole run: never under a running server.
const lock = lockOrFail(path.dirname(file));
process.on('exit', () => lock.release());
const db = new Database(file);
try {
  migrate(db);
  const started = performance.now();
  let lastReport = started;
  const result = seedMarketplace(db, {
    consumers,
    providers,
    requests,
    seed,
    onProgress: (done) => {
      const now = performance.now();
      if (now - lastReport > 2000 || done === requests) {
        lastReport = now;
        process.stderr.write(`seed: ${done.toLocaleString('en-US')} / ${requests.toLocaleString('en-US')} requests, ${((now - started) / 1000).toFixed(1)} s\n`);
      }
    },
  });
  const ms = Math.round(performance.now() - started);
  db.raw.pragma('wal_checkpoint(TRUNCATE)');
  process.stdout.write(`${JSON.stringify({ database: file, seed, ...result, ms, requestsPerSecond: Math.round((requests / Math.max(ms, 1)) * 1000) })}\n`);
} catch (err) {
  db.close();
  if (err instanceof MigrationError) fail(`migration stopped: ${err.message}`, 1);
  if (err instanceof SeedTargetNotEmptyError) fail(`${file}: ${err.message}`, 1);
  throw err;
}
db.close();
