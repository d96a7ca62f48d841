import fs from 'node:fs';
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';

export type SqliteDatabase = BetterSqlite3.Database;

export interface OpenDatabaseOptions {
  /** Called once per statement executed, with the statement's operation name (for `chatwire_db_queries_total`). */
  onQuery?: (op: string) => void;
  readonly?: boolean;
}

export interface StatementOptions {
  rowsAsArrays?: boolean;
  pluck?: boolean;
}

/** A prepared statement that reports every execution to `onQuery`. */
export interface CountedStatement<Row = unknown> {
  readonly op: string;
  get(...params: unknown[]): Row | undefined;
  all(...params: unknown[]): Row[];
  run(...params: unknown[]): BetterSqlite3.RunResult;
  readonly source: string;
}

/**
 * The one SQLite connection of the process (better-sqlite3 is synchronous, so
 * one connection serialises writes without locks). WAL lets readers and the
 * checkpointer run alongside the writer.
 */
export class Database {
  readonly raw: SqliteDatabase;
  readonly file: string;
  private readonly onQuery: (op: string) => void;

  constructor(file: string, options: OpenDatabaseOptions = {}) {
    if (file !== ':memory:') fs.mkdirSync(path.dirname(file), { recursive: true });
    this.file = file;
    this.raw = new BetterSqlite3(file, { readonly: options.readonly ?? false });
    this.onQuery = options.onQuery ?? (() => {});
    if (!options.readonly) {
      this.raw.pragma('journal_mode = WAL');
      // NORMAL in WAL mode is durable against a process crash (SIGKILL); only an OS crash can lose the last commits.
      this.raw.pragma('synchronous = NORMAL');
    }
    this.raw.pragma('foreign_keys = ON');
    this.raw.pragma('busy_timeout = 5000');
    this.raw.pragma('cache_size = -65536');
    this.raw.pragma('temp_store = MEMORY');
  }

  /**
   * `rowsAsArrays`: rows come back as arrays in column order (better-sqlite3's
   * raw mode), which skips building an object per row.
   *
   * `pluck`: the statement selects one column and rows come back as its
   * value (the marketplace pages: one JSON text per row).
   */
  prepare<Row = unknown>(op: string, sql: string, options: StatementOptions = {}): CountedStatement<Row> {
    const stmt = this.raw.prepare(sql);
    if (options.rowsAsArrays) stmt.raw(true);
    if (options.pluck) stmt.pluck(true);
    const onQuery = this.onQuery;
    const reader = stmt.reader;
    return {
      op,
      source: sql,
      get: (...params: unknown[]) => {
        onQuery(op);
        return stmt.get(...params) as Row | undefined;
      },
      all: (...params: unknown[]) => {
        onQuery(op);
        return stmt.all(...params) as Row[];
      },
      run: (...params: unknown[]) => {
        if (reader) throw new Error(`statement ${op} returns rows; use get or all`);
        onQuery(op);
        return stmt.run(...params);
      },
    };
  }

  transaction<T>(fn: () => T): T {
    return this.raw.transaction(fn)();
  }

  close(): void {
    if (this.raw.open) this.raw.close();
  }
}
