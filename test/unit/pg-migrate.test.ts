import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { MigrationError } from '../../src/db/migrate.js';
import { openPostgres, type Pg } from '../../src/db/pg.js';
import { defaultPgMigrationsDir, migratePg } from '../../src/db/pg-migrate.js';
import { createTestDatabase, databaseUrl, dropTestDatabase, pgTestOptions } from '../helpers/postgres.js';

const options = await pgTestOptions();
const run = promisify(execFile);
const migrateScript = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../scripts/migrate.js');

/** An empty database of its own; `pools` opens that many separate pools on it (as many nodes would). */
async function database(t: { after(fn: () => Promise<void>): void }, pools = 1): Promise<Pg[]> {
  const name = await createTestDatabase();
  const sqls = Array.from({ length: pools }, () => openPostgres(databaseUrl(name), { max: 1 }));
  t.after(async () => {
    await Promise.all(sqls.map((sql) => sql.end({ timeout: 5 })));
    await dropTestDatabase(name);
  });
  return sqls;
}

/** A migrations dir with three small migrations; the second sleeps, so that racing migrators overlap. */
function migrationsDir(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-pg-migrations-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, '001_people.sql'), 'CREATE TABLE people (id bigint PRIMARY KEY, name text NOT NULL);\n');
  fs.writeFileSync(
    path.join(dir, '002_pets.sql'),
    'SELECT pg_sleep(0.2);\nCREATE TABLE pets (id bigint PRIMARY KEY, owner bigint NOT NULL REFERENCES people (id));\n',
  );
  fs.writeFileSync(path.join(dir, '003_counter.sql'), 'CREATE TABLE counter (n integer NOT NULL);\nINSERT INTO counter VALUES (1);\n');
  return dir;
}

const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

test('nodes starting together apply each migration once, in order, under the advisory lock', options, async (t) => {
  const dir = migrationsDir(t);
  const nodes = await database(t, 5);
  const results = await Promise.all(nodes.map((sql) => migratePg(sql, dir)));
  // Every migration was applied by exactly one node; the others found it done.
  assert.deepEqual(results.flat().sort(), ['001_people.sql', '002_pets.sql', '003_counter.sql']);
  const [sql] = nodes as [Pg];
  assert.deepEqual(
    (await sql`SELECT n FROM counter`).map((r) => r.n),
    [1],
  );
  const rows = await sql`SELECT version, name, checksum FROM schema_migrations ORDER BY version`;
  assert.deepEqual(
    [...rows].map((r) => ({ ...r })),
    ['001_people.sql', '002_pets.sql', '003_counter.sql'].map((name, i) => ({ version: i + 1, name, checksum: sha256(path.join(dir, name)) })),
  );
  assert.deepEqual(await migratePg(sql, dir), []);
});

test('a PostgreSQL migration changed or removed after it was applied stops the start with a message naming it', options, async (t) => {
  const dir = migrationsDir(t);
  const [sql] = (await database(t)) as [Pg];
  await migratePg(sql, dir);
  fs.appendFileSync(path.join(dir, '001_people.sql'), 'CREATE INDEX people_by_name ON people (name);\n');
  await assert.rejects(migratePg(sql, dir), (err: unknown) => {
    assert.ok(err instanceof MigrationError);
    assert.match(err.message, /^migration 001_people\.sql was changed after it was applied .*add a new migration instead of editing an applied one$/);
    return true;
  });
  fs.rmSync(path.join(dir, '001_people.sql'));
  await assert.rejects(migratePg(sql, dir), {
    name: 'MigrationError',
    message: `migration 001_people.sql was applied to this database but its file is missing from ${dir}`,
  });
});

test('a failing PostgreSQL migration is rolled back whole and not recorded; the ones before it stay', options, async (t) => {
  const dir = migrationsDir(t);
  fs.writeFileSync(path.join(dir, '004_broken.sql'), 'CREATE TABLE toys (id bigint PRIMARY KEY);\nINSERT INTO nowhere VALUES (1);\n');
  const [sql] = (await database(t)) as [Pg];
  await assert.rejects(migratePg(sql, dir), /relation "nowhere" does not exist/);
  assert.deepEqual(
    (await sql`SELECT version FROM schema_migrations ORDER BY version`).map((r) => r.version),
    [1, 2, 3],
  );
  assert.deepEqual(
    (await sql`SELECT to_regclass('toys') AS toys`).map((r) => r.toys),
    [null],
  );
});

test('the project PostgreSQL migrations apply to an empty database, and again change nothing', options, async (t) => {
  const [sql] = (await database(t)) as [Pg];
  const files = fs
    .readdirSync(defaultPgMigrationsDir())
    .filter((f) => f.endsWith('.sql'))
    .sort();
  assert.deepEqual(await migratePg(sql), files);
  assert.deepEqual(await migratePg(sql), []);
  const tables = await sql`SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename`;
  assert.deepEqual(
    tables.map((r) => r.tablename),
    ['bookings', 'consumers', 'conversations', 'idempotency_keys', 'messages', 'providers', 'quotes', 'requests', 'schema_migrations', 'tasks'],
  );
});

test('npm run migrate -- --database-url shows, applies and checks the PostgreSQL migrations', options, async (t) => {
  const [sql] = (await database(t)) as [Pg];
  const url = databaseUrl((await sql`SELECT current_database() AS name`)[0]!.name as string);
  const files = fs
    .readdirSync(defaultPgMigrationsDir())
    .filter((f) => f.endsWith('.sql'))
    .sort();
  const env = { ...process.env, CHATWIRE_DATABASE_URL: '' };
  const before = await run(process.execPath, [migrateScript, '--status', '--database-url', url], { env });
  for (const file of files) assert.match(before.stdout, new RegExp(`^  ${file} +[0-9a-f]{12}  pending$`, 'm'));
  assert.match(before.stdout, new RegExp(`^0 applied, ${files.length} pending$`, 'm'));
  // CHATWIRE_DATABASE_URL names the database when no flag does.
  const applied = await run(process.execPath, [migrateScript], { env: { ...env, CHATWIRE_DATABASE_URL: url } });
  assert.equal(applied.stdout, `database ${url}: applied ${files.join(', ')}\n`);
  const again = await run(process.execPath, [migrateScript, '--database-url', url], { env });
  assert.equal(again.stdout, `database ${url} is up to date\n`);
  await sql`UPDATE schema_migrations SET checksum = 'feedfacefeedface' WHERE name = ${files[0]!}`;
  const status = await run(process.execPath, [migrateScript, '--status', '--database-url', url], { env });
  assert.match(status.stdout, new RegExp(`^  ${files[0]} +[0-9a-f]{12}  CHANGED since applied \\d{4}-`, 'm'));
  await assert.rejects(run(process.execPath, [migrateScript, '--database-url', url], { env }), (err: { code: number; stderr: string }) => {
    assert.equal(err.code, 1);
    assert.match(err.stderr, new RegExp(`^migration stopped: migration ${files[0]} was changed after it was applied \\(checksum feedfacefeed recorded`));
    return true;
  });
});
