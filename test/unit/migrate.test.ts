import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { lockDataDir } from '../../src/db/data-dir-lock.js';
import { Database } from '../../src/db/database.js';
import { defaultMigrationsDir, migrate, MigrationError, migrationStatus } from '../../src/db/migrate.js';

const run = promisify(execFile);
const migrateScript = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../scripts/migrate.js');
const seedScript = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../scripts/seed.js');

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-migrate-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A migrations dir with two small migrations, and a database to run them on. */
function setup(t: { after(fn: () => void): void }) {
  const root = tempDir(t);
  const dir = path.join(root, 'migrations');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, '001_people.sql'), 'CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL) STRICT;\n');
  fs.writeFileSync(path.join(dir, '002_pets.sql'), 'CREATE TABLE pets (id INTEGER PRIMARY KEY, owner INTEGER NOT NULL REFERENCES people (id)) STRICT;\n');
  const db = new Database(path.join(root, 'test.sqlite'));
  t.after(() => db.close());
  return { dir, db };
}

const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

test('pending migrations are applied once, in order, and recorded with their checksums', (t) => {
  const { dir, db } = setup(t);
  assert.deepEqual(migrate(db, dir), ['001_people.sql', '002_pets.sql']);
  assert.deepEqual(migrate(db, dir), []);
  const rows = db.raw.prepare('SELECT version, name, checksum FROM schema_migrations ORDER BY version').all();
  assert.deepEqual(rows, [
    { version: 1, name: '001_people.sql', checksum: sha256(path.join(dir, '001_people.sql')) },
    { version: 2, name: '002_pets.sql', checksum: sha256(path.join(dir, '002_pets.sql')) },
  ]);
  const tables = db.raw.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('people', 'pets') ORDER BY name").pluck().all();
  assert.deepEqual(tables, ['people', 'pets']);
});

test('a migration added later is applied on the next run, and status shows what is applied', (t) => {
  const { dir, db } = setup(t);
  fs.renameSync(path.join(dir, '002_pets.sql'), path.join(dir, '..', '002_pets.sql'));
  assert.deepEqual(migrate(db, dir), ['001_people.sql']);
  fs.renameSync(path.join(dir, '..', '002_pets.sql'), path.join(dir, '002_pets.sql'));
  const before = migrationStatus(db, dir);
  assert.deepEqual(
    before.map((m) => [m.name, m.appliedAt === null ? 'pending' : 'applied']),
    [
      ['001_people.sql', 'applied'],
      ['002_pets.sql', 'pending'],
    ],
  );
  assert.deepEqual(migrate(db, dir), ['002_pets.sql']);
  assert.ok(migrationStatus(db, dir).every((m) => m.appliedAt !== null));
});

test('a migration changed after it was applied stops the run with a message naming it', (t) => {
  const { dir, db } = setup(t);
  migrate(db, dir);
  fs.appendFileSync(path.join(dir, '001_people.sql'), 'CREATE INDEX people_by_name ON people (name);\n');
  assert.throws(
    () => migrate(db, dir),
    (err: unknown) => {
      assert.ok(err instanceof MigrationError);
      assert.match(err.message, /^migration 001_people\.sql was changed after it was applied .*add a new migration instead of editing an applied one$/);
      return true;
    },
  );
});

test('a migration whose file disappeared after it was applied stops the run', (t) => {
  const { dir, db } = setup(t);
  migrate(db, dir);
  fs.rmSync(path.join(dir, '002_pets.sql'));
  assert.throws(
    () => migrate(db, dir),
    (err: unknown) => {
      assert.ok(err instanceof MigrationError);
      assert.equal(err.message, `migration 002_pets.sql was applied to this database but its file is missing from ${dir}`);
      return true;
    },
  );
});

test('a failing migration is rolled back whole and not recorded', (t) => {
  const { dir, db } = setup(t);
  fs.writeFileSync(path.join(dir, '003_broken.sql'), 'CREATE TABLE toys (id INTEGER PRIMARY KEY) STRICT;\nINSERT INTO nowhere VALUES (1);\n');
  assert.throws(() => migrate(db, dir), /no such table: nowhere/);
  assert.deepEqual(db.raw.prepare('SELECT version FROM schema_migrations ORDER BY version').pluck().all(), [1, 2]);
  assert.equal(db.raw.prepare("SELECT count(*) FROM sqlite_master WHERE name = 'toys'").pluck().get(), 0);
});

test('the project migrations apply to an empty database', (t) => {
  const root = tempDir(t);
  const db = new Database(path.join(root, 'chatwire.sqlite'));
  t.after(() => db.close());
  assert.deepEqual(
    migrate(db),
    fs
      .readdirSync(defaultMigrationsDir())
      .filter((f) => f.endsWith('.sql'))
      .sort(),
  );
  assert.deepEqual(migrate(db), []);
});

test('npm run migrate -- --status lists pending migrations; plain migrate applies them', async (t) => {
  const dataDir = tempDir(t);
  const files = fs
    .readdirSync(defaultMigrationsDir())
    .filter((f) => f.endsWith('.sql'))
    .sort();
  const env = { ...process.env, CHATWIRE_DATA_DIR: dataDir };

  const before = await run(process.execPath, [migrateScript, '--status'], { env });
  assert.equal(before.stdout.split('\n')[0], `database ${path.join(dataDir, 'chatwire.sqlite')} (does not exist yet)`);
  assert.equal(fs.existsSync(path.join(dataDir, 'chatwire.sqlite')), false, '--status does not create the database');
  for (const file of files) assert.match(before.stdout, new RegExp(`^  ${file} +[0-9a-f]{12}  pending$`, 'm'));
  assert.match(before.stdout, new RegExp(`^0 applied, ${files.length} pending$`, 'm'));

  const applied = await run(process.execPath, [migrateScript], { env });
  assert.equal(applied.stdout, `database ${path.join(dataDir, 'chatwire.sqlite')}: applied ${files.join(', ')}\n`);

  const after = await run(process.execPath, [migrateScript, '--status', '--data-dir', dataDir], { env: process.env });
  for (const file of files) assert.match(after.stdout, new RegExp(`^  ${file} +[0-9a-f]{12}  applied \\d{4}-\\d\\d-\\d\\dT`, 'm'));
  assert.match(after.stdout, new RegExp(`^${files.length} applied, 0 pending$`, 'm'));

  const again = await run(process.execPath, [migrateScript], { env });
  assert.equal(again.stdout, `database ${path.join(dataDir, 'chatwire.sqlite')} is up to date\n`);

  // While a server holds the data dir, applying (and seeding) stops at once; looking still works.
  const lock = lockDataDir(dataDir);
  t.after(() => lock.release());
  const held = await run(process.execPath, [migrateScript], { env }).catch((err: { code: number; stderr: string }) => err);
  assert.equal((held as { code: number }).code, 1);
  assert.match((held as { stderr: string }).stderr, /^the data dir .* is in use by another chatwire process/);
  const seeding = await run(process.execPath, [seedScript, '--requests', '10'], { env }).catch((err: { code: number; stderr: string }) => err);
  assert.equal((seeding as { code: number }).code, 1);
  assert.match((seeding as { stderr: string }).stderr, /^the data dir .* is in use by another chatwire process/);
  const looked = await run(process.execPath, [migrateScript, '--status'], { env });
  assert.match(looked.stdout, new RegExp(`^${files.length} applied, 0 pending$`, 'm'));
});

test('npm run migrate stops with exit code 1 and a clear message when an applied migration no longer matches its file', async (t) => {
  const dataDir = tempDir(t);
  const env = { ...process.env, CHATWIRE_DATA_DIR: dataDir };
  await run(process.execPath, [migrateScript], { env });
  // Stand-in for an edited file: the recorded checksum no longer matches the one on disk.
  const db = new Database(path.join(dataDir, 'chatwire.sqlite'));
  db.raw.prepare("UPDATE schema_migrations SET checksum = 'feedfacefeedface' WHERE name = '002_marketplace.sql'").run();
  db.close();

  const status = await run(process.execPath, [migrateScript, '--status'], { env });
  assert.match(status.stdout, /^ {2}002_marketplace\.sql +[0-9a-f]{12} {2}CHANGED since applied \d{4}-/m);

  await assert.rejects(run(process.execPath, [migrateScript], { env }), (err: { code: number; stderr: string }) => {
    assert.equal(err.code, 1);
    assert.match(
      err.stderr,
      /^migration stopped: migration 002_marketplace\.sql was changed after it was applied \(checksum feedfacefeed recorded, [0-9a-f]{12} on disk\)/,
    );
    return true;
  });
});
