/**
 * Applies pending migrations to the database in the data dir, or shows them.
 * Usage: npm run migrate [-- --status] [--data-dir <dir>]
 * The data dir is --data-dir, else CHATWIRE_DATA_DIR (read through loadConfig, default ./data).
 */
import fs from 'node:fs';
import path from 'node:path';
import { Database } from '../src/db/database.js';
import { defaultMigrationsDir, migrate, MigrationError, migrationStatus, readMigrations } from '../src/db/migrate.js';
import { databaseFileOf, fail, lockOrFail, parseCommandLine } from './command-line.js';

const usage = 'usage: npm run migrate [-- --status] [--data-dir <dir>]';

const values = parseCommandLine(usage, {
  status: { type: 'boolean', default: false },
  'data-dir': { type: 'string' },
});
const file = databaseFileOf(values['data-dir']);
if (values.status && !fs.existsSync(file)) {
  // Looking must not create the database.
  const files = readMigrations(defaultMigrationsDir());
  process.stdout.write(`database ${file} (does not exist yet)\n`);
  for (const m of files) process.stdout.write(`  ${m.name.padEnd(32)} ${m.checksum.slice(0, 12)}  pending\n`);
  process.stdout.write(`0 applied, ${files.length} pending\n`);
  process.exit(0);
}
// Applying takes the data dir's lock: never under a running server, which would not see the schema change.
const lock = values.status ? null : lockOrFail(path.dirname(file));
const db = new Database(file);
try {
  if (values.status) {
    const files = migrationStatus(db);
    // What the database recorded, to flag edited or vanished files the way a start would refuse them.
    const recorded = new Map(
      (db.raw.prepare('SELECT version, name, checksum FROM schema_migrations').all() as { version: number; name: string; checksum: string }[]).map(
        (r) => [r.version, r],
      ),
    );
    process.stdout.write(`database ${file}\n`);
    for (const m of files) {
      const row = recorded.get(m.version);
      const state = m.appliedAt === null ? 'pending' : row && row.checksum !== m.checksum ? `CHANGED since applied ${m.appliedAt}` : `applied ${m.appliedAt}`;
      process.stdout.write(`  ${m.name.padEnd(32)} ${m.checksum.slice(0, 12)}  ${state}\n`);
      recorded.delete(m.version);
    }
    for (const row of recorded.values()) process.stdout.write(`  ${row.name.padEnd(32)} ${row.checksum.slice(0, 12)}  MISSING: applied but its file is gone\n`);
    const pending = files.filter((m) => m.appliedAt === null).length;
    process.stdout.write(`${files.length - pending} applied, ${pending} pending\n`);
  } else {
    const applied = migrate(db);
    process.stdout.write(applied.length === 0 ? `database ${file} is up to date\n` : `database ${file}: applied ${applied.join(', ')}\n`);
  }
} catch (err) {
  db.close();
  lock?.release();
  if (err instanceof MigrationError) fail(`migration stopped: ${err.message}`, 1);
  throw err;
}
db.close();
lock?.release();
