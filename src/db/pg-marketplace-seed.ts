import {
  checkSeedOptions,
  generateMarketplace,
  SEED_COLUMNS,
  SeedTargetNotEmptyError,
  type SeedOptions,
  type SeedResult,
  type SeedTable,
} from './marketplace-seed.js';
import type { Pg, PgTx } from './pg.js';

/** The marketplace tables, and the PostgreSQL type of every column a seed gives (the arrays unnest binds). */
const COLUMN_TYPES: Record<string, string> = {
  consumer_id: 'bigint',
  provider_id: 'bigint',
  request_id: 'bigint',
  booking_id: 'bigint',
  quote_id: 'bigint',
  name: 'text',
  rating: 'double precision',
  title: 'text',
  category: 'text',
  status: 'text',
  created_at: 'bigint',
  scheduled_at: 'bigint',
  price_cents: 'bigint',
};
export const MARKETPLACE_TABLES: readonly SeedTable[] = Object.keys(SEED_COLUMNS) as SeedTable[];

/**
 * Inserts rows (arrays in `columns` order) with one statement: one array per
 * column, read back by unnest, which costs a fraction of a statement per row.
 */
export async function pgBulkInsert(sql: Pg | PgTx, table: string, columns: readonly string[], rows: readonly unknown[][]): Promise<void> {
  if (rows.length === 0) return;
  const arrays = columns.map((_, i) => rows.map((row) => row[i]));
  const casts = columns.map((column, i) => {
    const type = COLUMN_TYPES[column];
    if (!type) throw new Error(`no PostgreSQL type known for ${table}.${column}`);
    return `$${i + 1}::${type}[]`;
  });
  await sql.unsafe(`INSERT INTO ${table} (${columns.join(', ')}) SELECT * FROM unnest(${casts.join(', ')})`, arrays as never[]);
}

/** Moves the identity sequences past the ids a load gave explicitly, so that later inserts without an id do not collide. */
export async function pgSyncIdentities(sql: Pg | PgTx): Promise<void> {
  await sql`SELECT setval(pg_get_serial_sequence('bookings', 'booking_id'), coalesce(max(booking_id), 0) + 1, false) FROM bookings`;
  await sql`SELECT setval(pg_get_serial_sequence('quotes', 'quote_id'), coalesce(max(quote_id), 0) + 1, false) FROM quotes`;
}

/**
 * seedMarketplace (marketplace-seed.ts) for PostgreSQL: the same rows, byte
 * for byte, into a migrated database (db/migrations-pg). As there, the
 * secondary indexes are dropped for the load and built after it, inside one
 * transaction (a failed seed leaves the database as it was); then VACUUM
 * ANALYZE sets the visibility map the index-only scans need, and the planner's
 * statistics.
 */
export async function seedMarketplacePg(sql: Pg, options: SeedOptions): Promise<SeedResult> {
  checkSeedOptions(options);
  const result = await sql.begin(async (tx) => {
    const [{ n }] = await tx<[{ n: number }]>`SELECT (SELECT count(*) FROM consumers) + (SELECT count(*) FROM providers) AS n`;
    if (n > 0) throw new SeedTargetNotEmptyError('the marketplace tables already hold rows; seed an empty database');
    const indexes = await tx<{ name: string; definition: string }[]>`
      SELECT i.indexname AS name, i.indexdef AS definition FROM pg_indexes i
      WHERE i.schemaname = current_schema() AND i.tablename = ANY(${MARKETPLACE_TABLES as string[]})
        AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)`;
    for (const index of indexes) await tx.unsafe(`DROP INDEX ${index.name}`);
    const batches = generateMarketplace(options);
    let next = batches.next();
    for (; !next.done; next = batches.next()) {
      await pgBulkInsert(tx, next.value.table, SEED_COLUMNS[next.value.table], next.value.rows);
      if (next.value.requestsDone !== undefined) options.onProgress?.(next.value.requestsDone);
    }
    for (const index of indexes) await tx.unsafe(index.definition);
    await pgSyncIdentities(tx);
    return next.value;
  });
  await sql.unsafe(`VACUUM ANALYZE ${MARKETPLACE_TABLES.join(', ')}`);
  return result;
}
