import { MigrationError, projectMigrationsDir, readMigrations, type MigrationFile, type MigrationStatus } from './migrate.js';
import type { Pg, PgTx } from './pg.js';

/** db/migrations-pg: the PostgreSQL migrations. */
export function defaultPgMigrationsDir(): string {
  return projectMigrationsDir('migrations-pg');
}

/**
 * The advisory lock every chatwire node takes to migrate: nodes that start
 * together queue on it, and each after the first finds nothing left to do.
 * A constant of chatwire's own ('chatwire' in ASCII), so that no other
 * application's advisory locks collide with it by accident.
 */
export const MIGRATION_LOCK_KEY = 0x6368_6174_7769_7265n;

interface AppliedRow {
  version: number;
  name: string;
  checksum: string;
  applied_at: string;
}

async function ensureTable(tx: PgTx): Promise<void> {
  await tx`CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at text NOT NULL
  )`;
}

async function appliedRows(tx: PgTx | Pg): Promise<AppliedRow[]> {
  return tx<AppliedRow[]>`SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version`;
}

/** The same rule as SQLite's runner (migrate.ts): an applied migration whose file changed or went missing stops the start. */
function checkApplied(applied: AppliedRow[], files: MigrationFile[], dir: string): void {
  const byVersion = new Map(files.map((f) => [f.version, f]));
  for (const row of applied) {
    const file = byVersion.get(row.version);
    if (!file) throw new MigrationError(`migration ${row.name} was applied to this database but its file is missing from ${dir}`);
    if (file.checksum !== row.checksum) {
      throw new MigrationError(
        `migration ${row.name} was changed after it was applied (checksum ${row.checksum.slice(0, 12)} recorded, ${file.checksum.slice(0, 12)} on disk); add a new migration instead of editing an applied one`,
      );
    }
  }
}

/** The next migration to apply, or null when the database is up to date. */
function nextPending(applied: AppliedRow[], files: MigrationFile[]): MigrationFile | null {
  const last = applied.at(-1)?.version ?? 0;
  const appliedSet = new Set(applied.map((r) => r.version));
  const file = files.find((f) => !appliedSet.has(f.version));
  if (!file) return null;
  if (file.version < last) throw new MigrationError(`migration ${file.name} is older than the last applied one (${last}); number new migrations after it`);
  return file;
}

/**
 * Applies pending PostgreSQL migrations in order, each in its own transaction,
 * and records each with its checksum, as migrate() does for SQLite. Every
 * transaction first takes the migration advisory lock (released at its
 * commit or rollback), then reads what is applied: nodes starting together
 * apply each migration once, in order, and a node that waited sees what the
 * one before it applied. Returns the names of the migrations applied now.
 */
export async function migratePg(sql: Pg, dir = defaultPgMigrationsDir()): Promise<string[]> {
  const files = readMigrations(dir);
  const done: string[] = [];
  for (;;) {
    const applied = await sql.begin(async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`;
      await ensureTable(tx);
      const rows = await appliedRows(tx);
      checkApplied(rows, files, dir);
      const file = nextPending(rows, files);
      if (!file) return null;
      // Simple protocol: a migration file holds several statements.
      await tx.unsafe(file.sql).simple();
      await tx`INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (${file.version}, ${file.name}, ${file.checksum}, ${new Date().toISOString()})`;
      return file.name;
    });
    if (applied === null) return done;
    done.push(applied);
  }
}

/**
 * What is applied and what is pending, without changing anything, and what
 * the database recorded (to flag an edited or vanished file the way a start
 * would refuse it). No schema_migrations table yet: everything is pending.
 */
export async function pgMigrationStatus(
  sql: Pg,
  dir = defaultPgMigrationsDir(),
): Promise<{ files: MigrationStatus[]; recorded: { version: number; name: string; checksum: string }[] }> {
  const [{ exists }] = await sql<[{ exists: boolean }]>`SELECT to_regclass('schema_migrations') IS NOT NULL AS exists`;
  const recorded = exists ? await appliedRows(sql) : [];
  const applied = new Map(recorded.map((r) => [r.version, r]));
  const files = readMigrations(dir).map((m) => ({
    version: m.version,
    name: m.name,
    checksum: m.checksum,
    appliedAt: applied.get(m.version)?.applied_at ?? null,
  }));
  return { files, recorded };
}
