import assert from 'node:assert/strict';
import { test as nodeTest } from 'node:test';
import type { Identity } from '../../src/auth/identity.js';
import { createMarketplaceService, type MarketplaceService } from '../../src/marketplace/marketplace-service.js';
import { AppError } from '../../src/protocol/index.js';
import { ENGINES, engineOptions, FIXTURE, openStoreFixture, PAGE_BOOKINGS_OPS, wireId } from './marketplace-fixture.js';

const staff: Identity = { userId: 'ops-1', role: 'staff' };
const consumer = (n: number): Identity => ({ userId: wireId('c', n), role: 'consumer' });

/** What many connections ask at about the same moment: hot listing pages, each consumer's own records, a few mistakes. */
function crowd(): ((s: MarketplaceService) => Promise<unknown>)[] {
  const lookups: ((s: MarketplaceService) => Promise<unknown>)[] = [];
  for (let i = 0; i < 10; i++) lookups.push((s) => s.requestsList(consumer(1 + (i % 6)), {}));
  for (let i = 0; i < 5; i++) lookups.push((s) => s.requestsList(staff, { status: 'open' }));
  for (let i = 0; i < 5; i++) lookups.push((s) => s.requestsList(consumer(2), { category: 'plumbing', limit: 50 }));
  for (let c = 1; c <= FIXTURE.consumers; c++) {
    for (let i = 0; i < 3; i++) lookups.push((s) => s.consumerBookings(consumer(c), { consumerId: wireId('c', c) }));
    for (let i = 0; i < 2; i++) lookups.push((s) => s.consumerRequests(staff, { consumerId: wireId('c', c), limit: 30 }));
  }
  lookups.push((s) => s.consumerBookings(consumer(2), { consumerId: wireId('c', 1) })); // forbidden
  lookups.push((s) => s.consumerRequests(staff, { consumerId: wireId('c', 99_999) })); // not_found
  lookups.push((s) => s.consumerRequests(staff, { consumerId: wireId('c', FIXTURE.emptyConsumerId) })); // empty page
  lookups.push((s) => s.requestsList(staff, { cursor: 'garbage' })); // bad_request
  return lookups;
}

type Outcome = { value: unknown } | { code: string };
async function outcome(p: Promise<unknown>): Promise<Outcome> {
  try {
    return { value: await p };
  } catch (err) {
    assert.ok(err instanceof AppError, String(err));
    return { code: err.code };
  }
}

function tally(ops: string[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const op of ops) counts[op] = (counts[op] ?? 0) + 1;
  return counts;
}

// The batching is the service's: it holds the same on either store.
for (const engine of ENGINES) {
  const options = await engineOptions(engine);
  const test = (name: string, fn: (t: { after(fn: () => void | Promise<void>): void }) => Promise<void>) => nodeTest(`${name} [${engine}]`, options, fn);

  test('concurrent lookups from many callers in one tick share queries, and each caller gets exactly its own result', async (t) => {
    const fixture = await openStoreFixture(t, engine);
    const service = createMarketplaceService({ store: fixture.store });
    t.after(() => service.close());
    const lookups = crowd();

    // One at a time: nothing to merge with.
    const alone: Outcome[] = [];
    for (const lookup of lookups) alone.push(await outcome(lookup(service)));
    const aloneQueries = fixture.ops.length;

    fixture.ops.length = 0;
    const together = await Promise.all(lookups.map((lookup) => outcome(lookup(service))));
    assert.deepEqual(together, alone);
    assert.deepEqual(
      together.filter((o) => 'code' in o),
      [{ code: 'forbidden' }, { code: 'not_found' }, { code: 'bad_request' }],
    );

    assert.deepEqual(tally(fixture.ops), {
      // One page query per distinct page: identical pages asked together are read once.
      'requests.page': 3,
      'consumer_bookings.page': FIXTURE.consumers,
      'consumer_requests.page': FIXTURE.consumers + 2,
      // One query for the bookings of every consumer.requests page (none where the pages bring them), one for both existence checks.
      ...(PAGE_BOOKINGS_OPS[engine].length > 0 ? { 'bookings.by_request': 1 } : {}),
      'consumers.by_id': 1,
    });
    assert.ok(fixture.ops.length < lookups.length / 2, `${fixture.ops.length} queries for ${lookups.length} lookups`);
    // One at a time, every lookup ran its own: a page each (the forbidden one and the bad cursor none), an
    // existence check for the unknown and the empty consumer, and the bookings of each non-empty consumer.requests page.
    const pages = 20 + 5 * FIXTURE.consumers + 2;
    assert.equal(aloneQueries, pages + 2 + 2 * FIXTURE.consumers * PAGE_BOOKINGS_OPS[engine].length);
    assert.ok(aloneQueries >= 3 * fixture.ops.length, `${aloneQueries} queries one at a time, ${fixture.ops.length} together`);
  });

  test('with batching off, concurrent lookups each run their own queries and still get the same results', async (t) => {
    const fixture = await openStoreFixture(t, engine);
    const batched = createMarketplaceService({ store: fixture.store });
    const unbatched = createMarketplaceService({ store: fixture.store, batching: false });
    t.after(() => {
      batched.close();
      unbatched.close();
    });
    const lookups = crowd();

    const alone: Outcome[] = [];
    for (const lookup of lookups) alone.push(await outcome(lookup(batched)));
    const aloneQueries = fixture.ops.length;

    fixture.ops.length = 0;
    const together = await Promise.all(lookups.map((lookup) => outcome(lookup(unbatched))));
    assert.deepEqual(together, alone);
    assert.equal(fixture.ops.length, aloneQueries);
  });

  test('a lookup that fails does not fail the others merged with it', async (t) => {
    const fixture = await openStoreFixture(t, engine);
    const service = createMarketplaceService({ store: fixture.store });
    t.after(() => service.close());
    const [missing, present, forbidden] = await Promise.all([
      outcome(service.consumerBookings(staff, { consumerId: wireId('c', 99_999) })),
      outcome(service.consumerBookings(staff, { consumerId: wireId('c', FIXTURE.emptyConsumerId) })),
      outcome(service.consumerBookings(consumer(3), { consumerId: wireId('c', 4) })),
    ]);
    assert.deepEqual(missing, { code: 'not_found' });
    assert.deepEqual(present, { value: { items: [], nextCursor: null } });
    assert.deepEqual(forbidden, { code: 'forbidden' });
    // Both existence checks went out as one query.
    assert.deepEqual(tally(fixture.ops), { 'consumer_bookings.page': 2, 'consumers.by_id': 1 });
  });

  test('close rejects lookups still waiting for their batch', async (t) => {
    const fixture = await openStoreFixture(t, engine);
    const service = createMarketplaceService({ store: fixture.store });
    const pending = service.requestsList(staff, {});
    service.close();
    await assert.rejects(pending, { name: 'BatchLoaderClosedError' });
    assert.deepEqual(fixture.ops, []);
  });
}
