import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Database } from './database.js';

/** db/<name> at the project root, from both src/db (tsx) and dist/src/db (compiled). */
export function projectMigrationsDir(name: 'migrations' | 'migrations-pg'): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = path.join(dir, 'db', name);
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(candidate)) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error(`db/${name} not found above ${fileURLToPath(import.meta.url)}`);
}

/** db/migrations: the SQLite migrations. */
export function defaultMigrationsDir(): string {
  return projectMigrationsDir('migrations');
}

export class MigrationError extends Error {
  override name = 'MigrationError';
}

export interface MigrationFile {
  version: number;
  name: string;
  sql: string;
  checksum: string;
}

export interface MigrationStatus {
  version: number;
  name: string;
  checksum: string;
  appliedAt: string | null;
}

const FILE_RE = /^(\d{3,})_([a-z0-9_-]+)\.sql$/;

export function readMigrations(dir: string): MigrationFile[] {
  const files = fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.sql'))
    .sort();
  const seen = new Set<number>();
  return files.map((file) => {
    const m = FILE_RE.exec(file);
    if (!m) throw new MigrationError(`migration file ${file} must be named NNN_name.sql`);
    const version = Number(m[1]);
    if (seen.has(version)) throw new MigrationError(`two migrations share version ${version}`);
    seen.add(version);
    const sql = fs.readFileSync(path.join(dir, file), 'utf8');
    const checksum = crypto.createHash('sha256').update(sql).digest('hex');
    return { version, name: file, sql, checksum };
  });
}

function ensureTable(db: Database): void {
  db.raw.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL
  ) STRICT`);
}

function appliedRows(db: Database): { version: number; name: string; checksum: string; applied_at: string }[] {
  return db.raw.prepare('SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version').all() as {
    version: number;
    name: string;
    checksum: string;
    applied_at: string;
  }[];
}

/** What is applied and what is pending, without changing anything. */
export function migrationStatus(db: Database, dir = defaultMigrationsDir()): MigrationStatus[] {
  ensureTable(db);
  const applied = new Map(appliedRows(db).map((r) => [r.version, r]));
  return readMigrations(dir).map((m) => ({
    version: m.version,
    name: m.name,
    checksum: m.checksum,
    appliedAt: applied.get(m.version)?.applied_at ?? null,
  }));
}

/**
 * Applies pending migrations in order, each in its own transaction, and
 * records each with its checksum. An applied migration whose file changed or
 * disappeared stops the start: the schema would no longer match the code.
 * Returns the names of the migrations applied now.
 */
export function migrate(db: Database, dir = defaultMigrationsDir()): string[] {
  ensureTable(db);
  const files = readMigrations(dir);
  const byVersion = new Map(files.map((f) => [f.version, f]));
  const applied = appliedRows(db);
  for (const row of applied) {
    const file = byVersion.get(row.version);
    if (!file) throw new MigrationError(`migration ${row.name} was applied to this database but its file is missing from ${dir}`);
    if (file.checksum !== row.checksum) {
      throw new MigrationError(
        `migration ${row.name} was changed after it was applied (checksum ${row.checksum.slice(0, 12)} recorded, ${file.checksum.slice(0, 12)} on disk); add a new migration instead of editing an applied one`,
      );
    }
  }
  const last = applied.at(-1)?.version ?? 0;
  const appliedSet = new Set(applied.map((r) => r.version));
  const done: string[] = [];
  for (const file of files) {
    if (appliedSet.has(file.version)) continue;
    if (file.version < last) {
      throw new MigrationError(`migration ${file.name} is older than the last applied one (${last}); number new migrations after it`);
    }
    const insert = db.raw.prepare('INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)');
    db.raw.transaction(() => {
      db.raw.exec(file.sql);
      insert.run(file.version, file.name, file.checksum, new Date().toISOString());
    })();
    done.push(file.name);
  }
  return done;
}
