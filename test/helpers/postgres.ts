/**
 * PostgreSQL for the tests: this process gets databases of its own
 * (`chatwire_test_<pid>_<random>[_<n>]`), created through the server's
 * `postgres` database and dropped when the test file ends, passed or failed.
 *
 * The server is CHATWIRE_TEST_DATABASE_URL, default
 * postgres://postgres@127.0.0.1:5432/postgres. Where it does not answer, the
 * PostgreSQL tests skip with a message; under CI (CI set) they fail instead.
 */
import crypto from 'node:crypto';
import { after } from 'node:test';
import { openPostgres, type Pg } from '../../src/db/pg.js';

export const TEST_DATABASE_URL = process.env.CHATWIRE_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const RUN = `chatwire_test_${process.pid}_${crypto.randomBytes(4).toString('hex')}`;
const created = new Set<string>();
let admin: Pg | null = null;
let counter = 0;

function adminPool(): Pg {
  admin ??= openPostgres(TEST_DATABASE_URL, { max: 1, applicationName: 'chatwire-tests' });
  return admin;
}

/** The URL of database `name` on the test server. */
export function databaseUrl(name: string): string {
  const url = new URL(TEST_DATABASE_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

let reachable: Promise<string | null> | null = null;
/** null when the server answers, else why not. */
function unreachableReason(): Promise<string | null> {
  reachable ??= (async () => {
    const probe = openPostgres(TEST_DATABASE_URL, { max: 1, applicationName: 'chatwire-tests' });
    try {
      await Promise.race([probe`SELECT 1`, new Promise((_, reject) => setTimeout(() => reject(new Error('no answer within 5 s')), 5000).unref())]);
      return null;
    } catch (err) {
      return `PostgreSQL not reachable at ${TEST_DATABASE_URL} (${(err as Error).message}); set CHATWIRE_TEST_DATABASE_URL`;
    } finally {
      await probe.end({ timeout: 1 });
    }
  })();
  return reachable;
}

/**
 * Options for a test that needs PostgreSQL: `{ skip }` with the reason when
 * the server does not answer, unless CI is set (then the test runs, and fails
 * on its first query, saying why).
 */
export async function pgTestOptions(): Promise<{ skip?: string }> {
  const reason = await unreachableReason();
  if (reason === null) return {};
  if (process.env.CI) return {};
  return { skip: reason };
}

/** Fails with the probe's message when the server does not answer (under CI a test gets here instead of skipping). */
async function requireServer(): Promise<void> {
  const reason = await unreachableReason();
  if (reason !== null) throw new Error(reason);
}

/** Drops the databases of test processes that are gone (killed before their cleanup ran). */
async function dropOrphans(sql: Pg): Promise<void> {
  const rows = await sql<{ datname: string }[]>`SELECT datname FROM pg_database WHERE datname LIKE 'chatwire\\_test\\_%'`;
  for (const { datname } of rows) {
    const pid = Number(/^chatwire_test_(\d+)_/.exec(datname)?.[1]);
    if (!Number.isSafeInteger(pid) || pid === process.pid) continue;
    try {
      process.kill(pid, 0);
    } catch {
      await sql.unsafe(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
    }
  }
}

/** Creates a new, empty database of this run (or a copy of `template`), dropped when the file's tests end. Returns its name. */
export async function createTestDatabase(template?: string): Promise<string> {
  await requireServer();
  const sql = adminPool();
  if (created.size === 0) await dropOrphans(sql);
  const name = counter === 0 && template === undefined ? RUN : `${RUN}_${counter}`;
  counter++;
  created.add(name);
  await sql.unsafe(`CREATE DATABASE "${name}"${template === undefined ? '' : ` TEMPLATE "${template}"`}`);
  return name;
}

export async function dropTestDatabase(name: string): Promise<void> {
  if (!created.delete(name)) return;
  await adminPool().unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
}

after(async () => {
  if (admin === null) return;
  for (const name of [...created]) await dropTestDatabase(name);
  await admin.end({ timeout: 5 });
  admin = null;
});
