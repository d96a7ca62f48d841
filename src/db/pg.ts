import postgres from 'postgres';

/** A PostgreSQL pool (the `postgres` package): a tagged-template function that pipelines queries over its connections. */
export type Pg = postgres.Sql<{ int8: number }>;
/** The same inside `begin`: every query on the transaction's one connection. */
export type PgTx = postgres.TransactionSql<{ int8: number }>;

export interface OpenPostgresOptions {
  /** Connections in the pool; default 10. */
  max?: number;
  /** Shown to the server as application_name (pg_stat_activity); default 'chatwire'. */
  applicationName?: string;
}

/**
 * Opens a pool on a `postgres://` URL. Connections open lazily, on the first
 * query. bigint columns come back as numbers: every bigint chatwire stores (ids
 * of at most ten digits, epoch milliseconds) is a safe integer.
 */
export function openPostgres(url: string, options: OpenPostgresOptions = {}): Pg {
  return postgres(url, {
    max: options.max ?? 10,
    connection: { application_name: options.applicationName ?? 'chatwire' },
    // NOTICEs ("relation already exists, skipping") are not news; errors still throw.
    onnotice: () => {},
    types: { int8: { to: 20, from: [20], serialize: (n: number) => String(n), parse: (s: string) => Number(s) } },
  });
}

/**
 * Creates the database a `postgres://` URL names when it does not exist yet, through the server's `postgres`
 * database (the URL's credentials must be allowed to create databases). True when it was created.
 */
export async function createDatabaseIfMissing(url: string): Promise<boolean> {
  const target = new URL(url);
  const name = decodeURIComponent(target.pathname.replace(/^\//, ''));
  if (name === '' || name === 'postgres') return false;
  const admin = new URL(url);
  admin.pathname = '/postgres';
  const sql = openPostgres(admin.toString(), { max: 1, applicationName: 'chatwire-setup' });
  try {
    const found = await sql`SELECT 1 FROM pg_database WHERE datname = ${name}`;
    if (found.length > 0) return false;
    try {
      await sql.unsafe(`CREATE DATABASE "${name.replaceAll('"', '""')}"`);
    } catch (err) {
      // Another node or script created it between the check and here.
      if ((err as { code?: string }).code === '42P04') return false;
      throw err;
    }
    return true;
  } finally {
    await sql.end({ timeout: 1 });
  }
}
