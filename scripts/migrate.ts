/**
 * Applies pending migrations to the database, or shows them.
 * Usage: npm run migrate [-- --status] [--data-dir <dir> | --database-url <postgres://...>]
 * The database is PostgreSQL at --database-url, else at CHATWIRE_DATABASE_URL when set (the
 * migrations of db/migrations-pg, under the advisory lock nodes take at start); otherwise SQLite
 * in --data-dir, else CHATWIRE_DATA_DIR (read through loadConfig, default ./data).
 */
import fs from 'node:fs';
import path from 'node:path';
import { Database } from '../src/db/database.js';
import { defaultMigrationsDir, migrate, MigrationError, migrationStatus, readMigrations } from '../src/db/migrate.js';
import { openPostgres } from '../src/db/pg.js';
import { migratePg, pgMigrationStatus } from '../src/db/pg-migrate.js';
import { databaseFileOf, databaseUrlOf, fail, lockOrFail, parseCommandLine, redactUrl } from './command-line.js';

const usage = 'usage: npm run migrate [-- --status] [--data-dir <dir> | --database-url <postgres://...>]';

const values = parseCommandLine(usage, {
  status: { type: 'boolean', default: false },
  'data-dir': { type: 'string' },
  'database-url': { type: 'string' },
});

interface Listed {
  version: number;
  name: string;
  checksum: string;
  appliedAt: string | null;
}
/** One line per migration file, then the recorded migrations whose file is gone, then the totals. */
function printStatus(database: string, files: Listed[], recordedRows: { version: number; name: string; checksum: string }[]): void {
  const recorded = new Map(recordedRows.map((r) => [r.version, r]));
  process.stdout.write(`database ${database}\n`);
  for (const m of files) {
    const row = recorded.get(m.version);
    const state = m.appliedAt === null ? 'pending' : row && row.checksum !== m.checksum ? `CHANGED since applied ${m.appliedAt}` : `applied ${m.appliedAt}`;
    process.stdout.write(`  ${m.name.padEnd(32)} ${m.checksum.slice(0, 12)}  ${state}\n`);
    recorded.delete(m.version);
  }
  for (const row of recorded.values()) process.stdout.write(`  ${row.name.padEnd(32)} ${row.checksum.slice(0, 12)}  MISSING: applied but its file is gone\n`);
  const pending = files.filter((m) => m.appliedAt === null).length;
  process.stdout.write(`${files.length - pending} applied, ${pending} pending\n`);
}

if (values['data-dir'] !== undefined && values['database-url'] !== undefined) fail(`--data-dir and --database-url name two databases; give one\n${usage}`);
const databaseUrl = values['data-dir'] === undefined ? databaseUrlOf(values['database-url']) : undefined;
if (databaseUrl !== undefined) {
  const shown = redactUrl(databaseUrl);
  const sql = openPostgres(databaseUrl, { max: 1, applicationName: 'chatwire-migrate' });
  try {
    if (values.status) {
      const { files, recorded } = await pgMigrationStatus(sql);
      printStatus(shown, files, recorded);
    } else {
      const applied = await migratePg(sql);
      process.stdout.write(applied.length === 0 ? `database ${shown} is up to date\n` : `database ${shown}: applied ${applied.join(', ')}\n`);
    }
  } catch (err) {
    await sql.end({ timeout: 5 });
    if (err instanceof MigrationError) fail(`migration stopped: ${err.message}`, 1);
    throw err;
  }
  await sql.end({ timeout: 5 });
  process.exit(0);
}
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
    const files = migrationStatus(db); // creates schema_migrations when missing
    printStatus(
      file,
      files,
      db.raw.prepare('SELECT version, name, checksum FROM schema_migrations').all() as { version: number; name: string; checksum: string }[],
    );
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
