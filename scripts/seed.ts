/**
 * Fills the database with a deterministic marketplace data set (migrating first).
 * Usage: npm run seed -- [--consumers N] [--providers N] [--requests N] [--seed S] [--data-dir <dir> | --database-url <postgres://...>]
 * Defaults: 100,000 requests, one consumer per 10 requests, one provider per 50.
 * The database is PostgreSQL at --database-url, else at CHATWIRE_DATABASE_URL when set; otherwise
 * SQLite in --data-dir, else CHATWIRE_DATA_DIR (read through loadConfig, default ./data).
 * Prints progress on stderr and one JSON line with the counts and the time on stdout.
 */
import path from 'node:path';
import { Database } from '../src/db/database.js';
import { seedMarketplace, SeedTargetNotEmptyError, type SeedOptions, type SeedResult } from '../src/db/marketplace-seed.js';
import { migrate, MigrationError } from '../src/db/migrate.js';
import { openPostgres } from '../src/db/pg.js';
import { seedMarketplacePg } from '../src/db/pg-marketplace-seed.js';
import { migratePg } from '../src/db/pg-migrate.js';
import { databaseFileOf, databaseUrlOf, fail, lockOrFail, parseCommandLine, redactUrl } from './command-line.js';

const usage = 'usage: npm run seed -- [--consumers N] [--providers N] [--requests N] [--seed S] [--data-dir <dir> | --database-url <postgres://...>]';

const values = parseCommandLine(usage, {
  consumers: { type: 'string' },
  providers: { type: 'string' },
  requests: { type: 'string', default: '100000' },
  seed: { type: 'string', default: '1' },
  'data-dir': { type: 'string' },
  'database-url': { type: 'string' },
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
if (values['data-dir'] !== undefined && values['database-url'] !== undefined) fail(`--data-dir and --database-url name two databases; give one\n${usage}`);
const databaseUrl = values['data-dir'] === undefined ? databaseUrlOf(values['database-url']) : undefined;

const started = performance.now();
let lastReport = started;
const options: SeedOptions = {
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
};

function report(database: string, result: SeedResult): void {
  const ms = Math.round(performance.now() - started);
  process.stdout.write(`${JSON.stringify({ database, seed, ...result, ms, requestsPerSecond: Math.round((requests / Math.max(ms, 1)) * 1000) })}\n`);
}

function stop(database: string, err: unknown): never {
  if (err instanceof MigrationError) fail(`migration stopped: ${err.message}`, 1);
  if (err instanceof SeedTargetNotEmptyError) fail(`${database}: ${err.message}`, 1);
  throw err;
}

if (databaseUrl !== undefined) {
  const shown = redactUrl(databaseUrl);
  const sql = openPostgres(databaseUrl, { max: 1, applicationName: 'chatwire-seed' });
  try {
    await migratePg(sql);
    report(shown, await seedMarketplacePg(sql, options));
  } catch (err) {
    await sql.end({ timeout: 5 });
    stop(shown, err);
  }
  await sql.end({ timeout: 5 });
} else {
  const file = databaseFileOf(values['data-dir']);
  // The seed's one transaction holds SQLite's write lock for its whole run: never under a running server.
  const lock = lockOrFail(path.dirname(file));
  process.on('exit', () => lock.release());
  const db = new Database(file);
  try {
    migrate(db);
    const result = seedMarketplace(db, options);
    db.raw.pragma('wal_checkpoint(TRUNCATE)');
    report(file, result);
  } catch (err) {
    db.close();
    stop(file, err);
  }
  db.close();
}
