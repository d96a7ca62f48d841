import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { test as nodeTest } from 'node:test';
import type { Identity } from '../../src/auth/identity.js';
import { createMarketplaceService } from '../../src/marketplace/marketplace-service.js';
import { AppError, type Page } from '../../src/protocol/index.js';
import {
  ENGINES,
  engineOptions,
  FIXTURE,
  openStoreFixture,
  type Engine,
  referenceConsumerBookings,
  referenceConsumerRequests,
  referenceRequestsList,
  wireId,
} from './marketplace-fixture.js';

const staff: Identity = { userId: 'ops-1', role: 'staff' };
const consumer = (n: number): Identity => ({ userId: wireId('c', n), role: 'consumer' });

/** Follows nextCursor to the end; checks every page but the last is full and the last one ends the walk. */
async function walk<T>(fetch: (cursor: string | undefined) => Promise<Page<T>>, limit: number): Promise<T[]> {
  const items: T[] = [];
  let cursor: string | undefined;
  for (let pages = 0; ; pages++) {
    assert.ok(pages < 10_000, 'pagination does not end');
    const page = await fetch(cursor);
    items.push(...page.items);
    assert.ok(page.items.length <= limit);
    if (page.nextCursor === null) return items;
    assert.equal(page.items.length, limit, 'a page with a next cursor is full');
    cursor = page.nextCursor;
  }
}

function expectAppError(code: AppError['code']) {
  return (err: unknown) => {
    assert.ok(err instanceof AppError, `expected AppError ${code}, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  };
}

/** The seeded fixture behind the engine's store, and the service over it. */
async function withService(t: { after(fn: () => void | Promise<void>): void }, engine: Engine, batching = true) {
  const fixture = await openStoreFixture(t, engine);
  const service = createMarketplaceService({ store: fixture.store, batching });
  t.after(() => service.close());
  return { fixture, service, tables: fixture.tables };
}

// The same contract, whichever store serves it.
for (const engine of ENGINES) {
  const options = await engineOptions(engine);
  const test = (name: string, fn: (t: { after(fn: () => void | Promise<void>): void }) => Promise<void>) => nodeTest(`${name} [${engine}]`, options, fn);

  for (const batching of [true, false]) {
    test(`requests.list equals the reference on every filter combination, across all pages (batching ${batching})`, async (t) => {
      const { service, tables } = await withService(t, engine, batching);
      const filters = [
        {},
        { status: 'open' },
        { status: 'booked' },
        { status: 'closed' },
        { category: 'plumbing' },
        { category: 'roofing', status: 'booked' },
        { category: 'plumbing', status: 'closed' },
        { category: 'no-such-category' },
      ] as const;
      for (const filter of filters) {
        const expected = referenceRequestsList(tables, filter);
        for (const limit of [37, 100]) {
          const got = await walk((cursor) => service.requestsList(staff, { ...filter, limit, cursor }), limit);
          assert.deepEqual(got, expected, `filter ${JSON.stringify(filter)} limit ${limit}`);
        }
      }
      // Page size 1 over a filter small enough to walk one by one.
      const few = referenceRequestsList(tables, { category: 'plumbing', status: 'open' });
      assert.ok(few.length > 20);
      assert.deepEqual(await walk((cursor) => service.requestsList(staff, { category: 'plumbing', status: 'open', limit: 1, cursor }), 1), few);
    });

    test(`consumer.requests and consumer.bookings equal the reference for every consumer, across all pages (batching ${batching})`, async (t) => {
      const { service, tables } = await withService(t, engine, batching);
      for (let c = 1; c <= FIXTURE.consumers; c++) {
        const consumerId = wireId('c', c);
        const requests = referenceConsumerRequests(tables, c);
        const bookings = referenceConsumerBookings(tables, c);
        for (const limit of [1, 20, 100]) {
          if (limit === 1 && requests.length > 400) continue; // page size 1 is walked on the lighter consumers
          assert.deepEqual(
            await walk((cursor) => service.consumerRequests(staff, { consumerId, limit, cursor }), limit),
            requests,
            `requests of ${consumerId} limit ${limit}`,
          );
          assert.deepEqual(
            await walk((cursor) => service.consumerBookings(staff, { consumerId, limit, cursor }), limit),
            bookings,
            `bookings of ${consumerId} limit ${limit}`,
          );
        }
      }
    });
  }

  test('the fixture exercises what the comparison needs: deep pages, ties, several bookings per request', async (t) => {
    const { tables } = await withService(t, engine);
    const heavy = referenceConsumerRequests(tables, 1);
    assert.ok(heavy.length > 300, `consumer 1 has ${heavy.length} requests`);
    assert.ok(referenceConsumerBookings(tables, 1).length > 100);
    assert.ok(
      heavy.some((r) => r.bookings.length >= 2),
      'a request with several bookings',
    );
    const nested = referenceConsumerRequests(tables, 2).find((r) => r.requestId === wireId('r', FIXTURE.requests + 2))!;
    assert.equal(new Set(nested.bookings.map((b) => b.scheduledAt)).size, 1, 'several bookings of one request in one slot');
    assert.equal(nested.bookings.length, 3);
    const created = tables.requests.map((r) => r.created_at);
    assert.ok(new Set(created).size < created.length - FIXTURE.tieRequests + 1, 'ties in created_at');
    const statuses = new Set(tables.bookings.map((b) => b.status));
    assert.deepEqual([...statuses].sort(), ['cancelled', 'completed', 'confirmed', 'pending']);
  });

  test('items are ordered newest first with the id breaking ties, as the opaque id strings compare', async (t) => {
    const { service } = await withService(t, engine);
    const items = await walk((cursor) => service.consumerRequests(staff, { consumerId: wireId('c', 1), limit: 100, cursor }), 100);
    let ties = 0;
    for (let i = 1; i < items.length; i++) {
      const [a, b] = [items[i - 1]!, items[i]!];
      assert.ok(a.createdAt > b.createdAt || (a.createdAt === b.createdAt && a.requestId > b.requestId), `${a.requestId} before ${b.requestId}`);
      if (a.createdAt === b.createdAt) ties++;
    }
    assert.ok(ties >= FIXTURE.tieRequests / 2 - 1);
  });

  test('defaults to 20 items, accepts up to 100, refuses more', async (t) => {
    const { service } = await withService(t, engine);
    assert.equal((await service.requestsList(staff, {})).items.length, 20);
    assert.equal((await service.consumerBookings(staff, { consumerId: wireId('c', 1) })).items.length, 20);
    assert.equal((await service.requestsList(staff, { limit: 100 })).items.length, 100);
    await assert.rejects(service.requestsList(staff, { limit: 101 }), expectAppError('bad_request'));
    await assert.rejects(service.consumerRequests(staff, { consumerId: wireId('c', 1), limit: 0 }), expectAppError('bad_request'));
  });

  test('nextCursor is null on the last page, also when the last page is exactly full', async (t) => {
    const { service, tables } = await withService(t, engine);
    const exact = referenceRequestsList(tables, { category: 'roofing', status: 'booked' }).length;
    assert.ok(exact >= 2 && exact <= 100);
    const page = await service.requestsList(staff, { category: 'roofing', status: 'booked', limit: exact });
    assert.equal(page.items.length, exact);
    assert.equal(page.nextCursor, null);
    const short = await service.requestsList(staff, { category: 'roofing', status: 'booked', limit: exact - 1 });
    assert.equal(short.items.length, exact - 1);
    assert.notEqual(short.nextCursor, null);
    const rest = await service.requestsList(staff, { category: 'roofing', status: 'booked', limit: 100, cursor: short.nextCursor! });
    assert.equal(rest.items.length, 1);
    assert.equal(rest.nextCursor, null);
    const empty = await service.requestsList(staff, { category: 'no-such-category' });
    assert.deepEqual(empty, { items: [], nextCursor: null });
  });

  test('a consumer with no records gets an empty page; its id exists', async (t) => {
    const { service } = await withService(t, engine);
    const id = wireId('c', FIXTURE.emptyConsumerId);
    assert.deepEqual(await service.consumerRequests(consumer(FIXTURE.emptyConsumerId), { consumerId: id }), { items: [], nextCursor: null });
    assert.deepEqual(await service.consumerBookings(staff, { consumerId: id }), { items: [], nextCursor: null });
  });

  test('unknown consumers are not_found for callers allowed to read them', async (t) => {
    const { service } = await withService(t, engine);
    for (const consumerId of [wireId('c', 99_999), 'c_99', 'bob', wireId('p', 1)]) {
      await assert.rejects(service.consumerRequests(staff, { consumerId }), expectAppError('not_found'), consumerId);
      await assert.rejects(service.consumerBookings(staff, { consumerId }), expectAppError('not_found'), consumerId);
    }
    // A signed-in user whose id is not a consumer record reads "its own" records: there are none.
    await assert.rejects(service.consumerBookings(consumer(99_999), { consumerId: wireId('c', 99_999) }), expectAppError('not_found'));
  });

  test('a consumer reads its own records; reading another consumer is forbidden whether or not it exists, without a query', async (t) => {
    const { service, fixture, tables } = await withService(t, engine);
    assert.deepEqual(
      (await service.consumerBookings(consumer(2), { consumerId: wireId('c', 2), limit: 5 })).items,
      referenceConsumerBookings(tables, 2).slice(0, 5),
    );
    fixture.ops.length = 0;
    for (const target of [wireId('c', 1), wireId('c', 99_999), 'c_1', 'anything']) {
      await assert.rejects(service.consumerRequests(consumer(2), { consumerId: target }), expectAppError('forbidden'), target);
      await assert.rejects(service.consumerBookings(consumer(2), { consumerId: target }), expectAppError('forbidden'), target);
    }
    await assert.rejects(service.consumerRequests({ userId: 'p-7', role: 'provider' }, { consumerId: wireId('c', 1) }), expectAppError('forbidden'));
    assert.deepEqual(fixture.ops, [], 'a forbidden lookup runs no query, so its timing cannot tell existing ids apart');
  });

  test('staff reads any consumer', async (t) => {
    const { service, tables } = await withService(t, engine);
    for (let c = 1; c <= FIXTURE.consumers; c++) {
      assert.deepEqual(
        (await service.consumerRequests(staff, { consumerId: wireId('c', c), limit: 3 })).items,
        referenceConsumerRequests(tables, c).slice(0, 3),
      );
    }
  });

  test('requests.list is open to every role', async (t) => {
    const { service } = await withService(t, engine);
    const pages = await Promise.all(
      [staff, consumer(1), { userId: 'p-1', role: 'provider' } as Identity, { userId: 'anon-1', role: 'consumer' } as Identity].map((c) =>
        service.requestsList(c, { limit: 5 }),
      ),
    );
    for (const page of pages) assert.deepEqual(page, pages[0]);
  });

  test('requests.list carries any text exactly: quotes, backslashes, control characters, non-ASCII (its rows travel as JSON)', async (t) => {
    const { service, fixture, tables } = await withService(t, engine);
    // PostgreSQL's text cannot hold U+0000 at all; every other character must come back as it went in.
    const nul = engine === 'postgres' ? '' : '\u0000nul';
    const titles = ['say "hi" \\ back\\slash', `tab\there\nnewline${nul}\u001f`, 'café ✓ 日本 😀', '</script>\u2028\u2029'];
    const newest = Math.max(...tables.requests.map((r) => r.created_at));
    await fixture.insertRequests(titles.map((title, i) => ({ title, category: `cat "${i}" é`, status: 'open', createdAt: newest + 1000 + i })));
    const page = await service.requestsList(staff, { limit: titles.length });
    assert.deepEqual(
      page.items.map((item) => [item.title, item.category]),
      titles.map((title, i) => [title, `cat "${i}" é`]).reverse(),
    );
    const filtered = await service.requestsList(staff, { category: 'cat "2" é', status: 'open' });
    assert.deepEqual(
      filtered.items.map((item) => item.title),
      [titles[2]],
    );
  });

  // ---------- cursors ----------

  /** The cursor format of src/marketplace/cursor.ts, rebuilt here to make well-formed cursors with wrong contents. */
  function forgeCursor(lookup: string, scope: string, payload: unknown): string {
    const body = Buffer.from(JSON.stringify(payload)).toString('base64url');
    const tag = crypto.createHash('sha256').update(`${lookup}\u0000${scope}\u0000${body}`).digest('base64url').slice(0, 12);
    return `${body}.${tag}`;
  }

  test('a cursor this module made, rebuilt by hand, pages exactly like the real one', async (t) => {
    const { service } = await withService(t, engine);
    const first = await service.consumerRequests(staff, { consumerId: wireId('c', 1), limit: 3 });
    const last = first.items[2]!;
    const forged = forgeCursor('consumer.requests', wireId('c', 1), [Date.parse(last.createdAt), Number(last.requestId.slice(2))]);
    assert.equal(forged, first.nextCursor);
  });

  test('garbage, tampered and wrongly typed cursors are bad_request', async (t) => {
    const { service } = await withService(t, engine);
    const consumerId = wireId('c', 1);
    const { nextCursor } = await service.consumerBookings(staff, { consumerId, limit: 5 });
    assert.ok(nextCursor);
    const [body, tag] = nextCursor.split('.') as [string, string];
    const flip = (s: string, i: number) => s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1);
    const bad: unknown[] = [
      'garbage',
      '',
      'a.b',
      `${body}.`,
      `${flip(body, 3)}.${tag}`,
      `${body}.${flip(tag, 0)}`,
      `${body}${body}.${tag}`,
      forgeCursor('consumer.bookings', consumerId, ['1717000000000', 5]),
      forgeCursor('consumer.bookings', consumerId, [1717000000000]),
      forgeCursor('consumer.bookings', consumerId, [1717000000000, 0]),
      forgeCursor('consumer.bookings', consumerId, [-1, 5]),
      forgeCursor('consumer.bookings', consumerId, [1.5, 5]),
      forgeCursor('consumer.bookings', consumerId, { t: 1717000000000, i: 5 }),
      12345,
      { t: 1 },
      'x'.repeat(300),
    ];
    for (const cursor of bad) {
      await assert.rejects(service.consumerBookings(staff, { consumerId, cursor } as never), expectAppError('bad_request'), JSON.stringify(cursor));
    }
  });

  test('a cursor only works for the lookup, filters and consumer that produced it', async (t) => {
    const { service } = await withService(t, engine);
    const listCursor = (await service.requestsList(staff, { status: 'open', limit: 2 })).nextCursor!;
    const requestsCursor = (await service.consumerRequests(staff, { consumerId: wireId('c', 1), limit: 2 })).nextCursor!;
    const bookingsCursor = (await service.consumerBookings(staff, { consumerId: wireId('c', 1), limit: 2 })).nextCursor!;
    const reject = (p: Promise<unknown>) => assert.rejects(p, expectAppError('bad_request'));

    await reject(service.consumerRequests(staff, { consumerId: wireId('c', 1), cursor: listCursor }));
    await reject(service.consumerRequests(staff, { consumerId: wireId('c', 1), cursor: bookingsCursor }));
    await reject(service.consumerBookings(staff, { consumerId: wireId('c', 1), cursor: requestsCursor }));
    await reject(service.requestsList(staff, { status: 'open', cursor: requestsCursor }));
    await reject(service.requestsList(staff, { cursor: listCursor }));
    await reject(service.requestsList(staff, { status: 'closed', cursor: listCursor }));
    await reject(service.requestsList(staff, { status: 'open', category: 'plumbing', cursor: listCursor }));
    await reject(service.consumerRequests(staff, { consumerId: wireId('c', 2), cursor: requestsCursor }));
    // ...and still works where it belongs.
    assert.equal((await service.requestsList(staff, { status: 'open', limit: 2, cursor: listCursor })).items.length, 2);
  });

  test('a forbidden caller with a bad cursor is told forbidden, not bad_request', async (t) => {
    const { service } = await withService(t, engine);
    await assert.rejects(service.consumerBookings(consumer(2), { consumerId: wireId('c', 1), cursor: 'garbage' }), expectAppError('forbidden'));
  });
}
