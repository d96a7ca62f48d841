import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Identity } from '../../src/auth/identity.js';
import { Database, type CountedStatement, type StatementOptions } from '../../src/db/database.js';
import { createMarketplaceService, type MarketplaceService } from '../../src/marketplace/marketplace-service.js';
import { createSqliteMarketplaceStore, type InListStrategy } from '../../src/db/marketplace-queries.js';
import {
  ENGINES,
  engineOptions,
  FIXTURE,
  openFixture,
  openStoreFixture,
  PAGE_BOOKINGS_OPS,
  referenceConsumerBookings,
  referenceConsumerRequests,
  referenceRequestsList,
  wireId,
} from './marketplace-fixture.js';

const staff: Identity = { userId: 'ops-1', role: 'staff' };
const FILTERS = [{}, { status: 'open' }, { category: 'plumbing' }, { category: 'plumbing', status: 'booked' }] as const;

/** Remembers every statement prepared through it: the plans test explains exactly the SQL the service runs. */
class RecordingDatabase extends Database {
  readonly prepared = new Map<string, string>();
  override prepare<Row = unknown>(op: string, sql: string, options?: StatementOptions): CountedStatement<Row> {
    this.prepared.set(sql, op);
    return super.prepare<Row>(op, sql, options);
  }
}

/** Runs every lookup shape: each filter combination, page sizes 1, 20, 100, first and later pages, empty pages. */
async function exerciseEveryLookup(service: MarketplaceService): Promise<void> {
  for (const limit of [1, 20, 100]) {
    for (const filter of FILTERS) {
      const first = await service.requestsList(staff, { ...filter, limit });
      await service.requestsList(staff, { ...filter, limit, cursor: first.nextCursor! });
    }
    for (const consumerId of [wireId('c', 1), wireId('c', FIXTURE.emptyConsumerId)]) {
      const requests = await service.consumerRequests(staff, { consumerId, limit });
      if (requests.nextCursor) await service.consumerRequests(staff, { consumerId, limit, cursor: requests.nextCursor });
      const bookings = await service.consumerBookings(staff, { consumerId, limit });
      if (bookings.nextCursor) await service.consumerBookings(staff, { consumerId, limit, cursor: bookings.nextCursor });
    }
  }
}

/** The index each page query must walk, by filter combination. */
function expectedPageIndex(op: string, sql: string): string | null {
  if (op === 'requests.page') {
    const status = sql.includes('r.status = ?');
    const category = sql.includes('r.category = ?');
    return category ? (status ? 'requests_by_category_status' : 'requests_by_category') : status ? 'requests_by_status' : 'requests_by_created';
  }
  return (
    {
      'consumer_requests.page': 'requests_by_consumer',
      'consumer_bookings.page': 'bookings_by_consumer',
      'bookings.by_request': 'bookings_by_request',
    }[op] ?? null
  );
}

/**
 * Point lookups by INTEGER PRIMARY KEY (the to-one joins, the existence
 * check) are accepted only here: the rowid table is itself the clustered
 * index holding every column, so the lookup is one b-tree descent, the same
 * as a covering index would be (docs/marketplace.md).
 */
const ROWID_LOOKUPS = new Set(['requests.page', 'consumer_bookings.page', 'bookings.by_request', 'consumers.by_id']);

function checkPlans(db: RecordingDatabase, strategy: InListStrategy): Set<string> {
  const used = new Set<string>();
  const statements = [...db.prepared].filter(([, op]) => !op.startsWith('seed.'));
  assert.deepEqual([...new Set(statements.map(([, op]) => op))].sort(), [
    'bookings.by_request',
    'consumer_bookings.page',
    'consumer_requests.page',
    'consumers.by_id',
    'requests.page',
  ]);
  assert.equal(statements.filter(([, op]) => op === 'requests.page').length, 4, 'one page statement per filter combination');
  for (const [sql, op] of statements) {
    const params = (sql.match(/\?/g) ?? []).length;
    const plan = (db.raw.prepare(`EXPLAIN QUERY PLAN ${sql}`).all(...new Array(params).fill(null)) as { detail: string }[]).map((r) => r.detail);
    const where = `${op}: ${plan.join(' | ')}`;
    const searches = plan.filter((line) => line.startsWith('SEARCH '));
    assert.ok(searches.length >= 1, where);
    for (const line of plan) {
      assert.doesNotMatch(line, /TEMP B-TREE/, where);
      if (strategy === 'json' && (line === 'LIST SUBQUERY 1' || line.startsWith('SCAN json_each VIRTUAL TABLE'))) continue; // the bound id list itself
      if (op === 'requests.page' && line === 'CORRELATED SCALAR SUBQUERY 1') continue; // the quote count, searched below
      assert.doesNotMatch(line, /\bSCAN\b/, where);
      const covering = /^SEARCH \w+ USING COVERING INDEX (\w+) \(/.exec(line);
      if (covering) {
        used.add(covering[1]!);
        continue;
      }
      assert.match(line, /^SEARCH \w+ USING INTEGER PRIMARY KEY \(rowid=\?\)$/, where);
      assert.ok(ROWID_LOOKUPS.has(op), `${where}: a rowid lookup where a covering index is due`);
    }
    const index = expectedPageIndex(op, sql);
    if (index) assert.match(searches[0]!, new RegExp(`USING COVERING INDEX ${index} \\(`), where);
    if (op === 'requests.page') assert.match(plan.at(-1)!, /^SEARCH q USING COVERING INDEX sqlite_autoindex_quotes_1 \(request_id=\?\)$/, where);
  }
  return used;
}

for (const strategy of ['params', 'json'] as const) {
  test(`every statement the lookups run is answered from a covering index, with no scan or sort, before and after ANALYZE (${strategy} id lists)`, async (t) => {
    const fixture = openFixture(t, { DatabaseClass: RecordingDatabase });
    const db = fixture.db as RecordingDatabase;
    const service = createMarketplaceService({ store: createSqliteMarketplaceStore(db, { inList: strategy }) });
    t.after(() => service.close());
    await exerciseEveryLookup(service);

    const used = checkPlans(db, strategy);
    db.raw.exec('ANALYZE');
    assert.deepEqual(checkPlans(db, strategy), used);

    // No index that no query uses: every index on the marketplace tables appears in some plan.
    const indexes = db.raw
      .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('consumers', 'providers', 'requests', 'quotes', 'bookings') ORDER BY name")
      .pluck()
      .all();
    assert.deepEqual([...used].sort(), indexes);
  });
}

for (const engine of ENGINES)
  for (const batching of [true, false]) {
    test(`query counts do not grow with the page size: 1, 20 and 100 (batching ${batching}) [${engine}]`, await engineOptions(engine), async (t) => {
      const fixture = await openStoreFixture(t, engine);
      const service = createMarketplaceService({ store: fixture.store, batching });
      t.after(() => service.close());
      const tables = fixture.tables;
      const count = async (lookup: () => Promise<unknown>): Promise<string[]> => {
        fixture.ops.length = 0;
        await lookup();
        return [...fixture.ops];
      };

      for (const limit of [1, 20, 100]) {
        for (const filter of FILTERS) {
          assert.ok(referenceRequestsList(tables, filter).length > limit);
          const first = await service.requestsList(staff, { ...filter, limit });
          for (const cursor of [undefined, first.nextCursor!]) {
            assert.deepEqual(
              await count(() => service.requestsList(staff, { ...filter, limit, cursor })),
              ['requests.page'],
              `requests.list ${JSON.stringify(filter)} limit ${limit}`,
            );
          }
        }

        const consumerId = wireId('c', 1);
        assert.ok(referenceConsumerRequests(tables, 1).length > limit);
        assert.deepEqual(
          await count(() => service.consumerRequests(staff, { consumerId, limit })),
          ['consumer_requests.page', ...PAGE_BOOKINGS_OPS[engine]],
          `consumer.requests limit ${limit}`,
        );
        assert.ok(referenceConsumerBookings(tables, 1).length > limit);
        assert.deepEqual(
          await count(() => service.consumerBookings(staff, { consumerId, limit })),
          ['consumer_bookings.page'],
          `consumer.bookings limit ${limit}`,
        );

        // The existence check runs only when the page is empty, in place of the relation queries.
        const empty = wireId('c', FIXTURE.emptyConsumerId);
        assert.deepEqual(await count(() => service.consumerRequests(staff, { consumerId: empty, limit })), ['consumer_requests.page', 'consumers.by_id']);
        assert.deepEqual(await count(() => service.consumerBookings(staff, { consumerId: empty, limit })), ['consumer_bookings.page', 'consumers.by_id']);
      }
    });
  }

test('json id lists give the same results as bound parameters', async (t) => {
  const fixture = openFixture(t);
  const byParams = createMarketplaceService({ store: createSqliteMarketplaceStore(fixture.db, { inList: 'params' }) });
  const byJson = createMarketplaceService({ store: createSqliteMarketplaceStore(fixture.db, { inList: 'json' }) });
  t.after(() => {
    byParams.close();
    byJson.close();
  });
  for (const limit of [1, 33, 100]) {
    for (const filter of FILTERS)
      assert.deepEqual(await byJson.requestsList(staff, { ...filter, limit }), await byParams.requestsList(staff, { ...filter, limit }));
    for (let c = 1; c <= FIXTURE.consumers; c++) {
      const q = { consumerId: wireId('c', c), limit };
      assert.deepEqual(await byJson.consumerRequests(staff, q), await byParams.consumerRequests(staff, q));
      assert.deepEqual(await byJson.consumerBookings(staff, q), await byParams.consumerBookings(staff, q));
    }
  }
});
