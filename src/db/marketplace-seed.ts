import type { Database } from './database.js';
import type { BookingStatus, RequestStatus } from './marketplace-store.js';

/**
 * A deterministic, realistic marketplace data set: the same options give the
 * same rows, byte for byte (the PRNG is seeded; no clock is read). Used by
 * `npm run seed`, the tests and `npm run bench:db`.
 *
 * Shape: request owners and quoting providers are skewed (a few consumers
 * post hundreds of requests, most post a handful); requests arrive in time
 * order, at whole seconds, so ties in created_at happen as they do in real
 * data; each request gets 0-6 quotes from distinct providers; about half the
 * quoted ones are booked at the quoted price, in half-hour slots (so many
 * bookings share scheduled_at); a cancelled booking is sometimes rebooked with
 * another provider, giving a request several bookings.
 */
export interface SeedOptions {
  consumers: number;
  providers: number;
  requests: number;
  /** PRNG seed; default 1. */
  seed?: number;
  /** "Now" of the data set, epoch ms: bookings before it are completed or cancelled. Default 2025-06-01T00:00:00Z. */
  endMs?: number;
  /** The requests are spread over this many ms before endMs; default two years. */
  spanMs?: number;
  /** Requests (with their quotes and bookings) per insert statement; default 10,000. */
  batchSize?: number;
  onProgress?: (requestsDone: number) => void;
}

export interface SeedResult {
  consumers: number;
  providers: number;
  requests: number;
  quotes: number;
  bookings: number;
}

/** Seeding appends to nothing: ids start at 1 so that the same options give the same data set. */
export class SeedTargetNotEmptyError extends Error {
  override name = 'SeedTargetNotEmptyError';
}

export const SEED_END_MS = Date.UTC(2025, 5, 1);
const DAY_MS = 86_400_000;

/** sfc32, seeded through splitmix32: fast, small state, good enough for test data. */
export function createRandom(seed: number): { next(): number; int(n: number): number } {
  let s = seed >>> 0;
  const splitmix = (): number => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = splitmix();
  let b = splitmix();
  let c = splitmix();
  let d = splitmix();
  const next = (): number => {
    const t = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) >>> 0;
    return t / 4294967296;
  };
  for (let i = 0; i < 12; i++) next();
  return { next, int: (n) => Math.floor(next() * n) };
}

const FIRST_NAMES = [
  'Ada',
  'Ben',
  'Chloe',
  'Dev',
  'Elena',
  'Farah',
  'George',
  'Hana',
  'Ivan',
  'Jade',
  'Kofi',
  'Lena',
  'Marco',
  'Nadia',
  'Omar',
  'Priya',
  'Quinn',
  'Rosa',
  'Sam',
  'Tariq',
  'Uma',
  'Victor',
  'Wen',
  'Ximena',
  'Yusuf',
  'Zoe',
  'Liam',
  'Maya',
  'Noah',
  'Olivia',
  'Aisha',
  'Mateo',
  'Sofia',
  'Kenji',
  'Ingrid',
  'Tomas',
  'Leila',
  'Oscar',
  'Mei',
  'Felix',
];
const LAST_NAMES = [
  'Adams',
  'Bauer',
  'Costa',
  'Dubois',
  'Evans',
  'Fischer',
  'Garcia',
  'Hughes',
  'Ito',
  'Jensen',
  'Kowalski',
  'Lopez',
  'Murphy',
  'Nguyen',
  'Okafor',
  'Patel',
  'Quintero',
  'Rossi',
  'Schmidt',
  'Tanaka',
  'Usman',
  'Varga',
  'Walsh',
  'Xu',
  'Yilmaz',
  'Zhang',
  'Silva',
  'Novak',
  'Haddad',
  'Moreau',
  'Kim',
  'Larsen',
  'Mendes',
  'Brennan',
  'Sato',
  'Ahmed',
];
const PROVIDER_SUFFIXES = ['', ' Co.', ' & Sons', ' Ltd', ' Pros', ' Services', ' Group', ' & Daughters'];

interface Category {
  name: string;
  weight: number;
  trade: string;
  /** Typical job price in cents. */
  baseCents: number;
  titles: string[];
}

const PLACES = ['kitchen', 'bathroom', 'living room', 'bedroom', 'hallway', 'garage', 'office', 'basement'];

const CATEGORIES: Category[] = [
  {
    name: 'plumbing',
    weight: 16,
    trade: 'Plumbing',
    baseCents: 18_000,
    titles: [
      'Fix leaking tap in the {place}',
      'Unclog {place} drain',
      'Replace water heater',
      'Install a new toilet',
      'Repair burst pipe under the {place} floor',
      'Fit a new shower',
    ],
  },
  {
    name: 'electrical',
    weight: 13,
    trade: 'Electrical',
    baseCents: 22_000,
    titles: [
      'Install ceiling fan in the {place}',
      'Replace fuse box',
      'Add sockets in the {place}',
      'Fix flickering lights in the {place}',
      'Wire outdoor lighting',
      'Install EV charger',
    ],
  },
  {
    name: 'cleaning',
    weight: 15,
    trade: 'Cleaning',
    baseCents: 9_000,
    titles: [
      'Deep clean the {place}',
      'End of tenancy clean',
      'Carpet cleaning in the {place}',
      'Window cleaning, two floors',
      'Weekly home cleaning',
      'Oven and {place} clean',
    ],
  },
  {
    name: 'moving',
    weight: 8,
    trade: 'Removals',
    baseCents: 45_000,
    titles: [
      'Move a two-bedroom flat across town',
      'Move a piano to the {place}',
      'Office move, ten desks',
      'Single item delivery: sofa',
      'Pack and move a studio',
      'Clear out the {place} for moving',
    ],
  },
  {
    name: 'painting',
    weight: 10,
    trade: 'Painting',
    baseCents: 30_000,
    titles: [
      'Paint the {place} walls',
      'Repaint exterior window frames',
      'Wallpaper the {place}',
      'Paint the fence',
      'Ceiling repaint in the {place}',
      'Varnish the {place} doors',
    ],
  },
  {
    name: 'gardening',
    weight: 10,
    trade: 'Gardens',
    baseCents: 12_000,
    titles: [
      'Mow lawn and trim hedges',
      'Plant a vegetable bed',
      'Remove an old tree stump',
      'Autumn leaf clear-up',
      'Lay new turf',
      'Build raised flower beds',
    ],
  },
  {
    name: 'carpentry',
    weight: 7,
    trade: 'Carpentry',
    baseCents: 26_000,
    titles: [
      'Build shelves in the {place}',
      'Hang a new {place} door',
      'Repair the deck',
      'Fit kitchen cabinets',
      'Assemble flat-pack wardrobe',
      'Replace skirting boards in the {place}',
    ],
  },
  {
    name: 'roofing',
    weight: 4,
    trade: 'Roofing',
    baseCents: 60_000,
    titles: [
      'Fix a roof leak over the {place}',
      'Replace missing tiles',
      'Clean and repair gutters',
      'Re-felt the shed roof',
      'Inspect roof after storm',
      'Seal the chimney flashing',
    ],
  },
  {
    name: 'hvac',
    weight: 6,
    trade: 'Heating & Cooling',
    baseCents: 35_000,
    titles: [
      'Service the boiler',
      'Install air conditioning in the {place}',
      'Bleed and balance radiators',
      'Replace the thermostat',
      'Fix a noisy heat pump',
      'Install a radiator in the {place}',
    ],
  },
  {
    name: 'appliance-repair',
    weight: 5,
    trade: 'Appliance Repair',
    baseCents: 11_000,
    titles: ['Washing machine does not drain', 'Fridge not cooling', 'Dishwasher leaks', 'Oven will not heat', 'Dryer makes a loud noise', 'Install a new hob'],
  },
  {
    name: 'pest-control',
    weight: 3,
    trade: 'Pest Control',
    baseCents: 14_000,
    titles: [
      'Mice in the {place}',
      'Wasp nest under the eaves',
      'Ant problem in the {place}',
      'Bed bug treatment',
      'Pigeon proofing the balcony',
      'Moth treatment in the {place}',
    ],
  },
  {
    name: 'handyman',
    weight: 3,
    trade: 'Handyman Services',
    baseCents: 8_000,
    titles: [
      'Mount a TV in the {place}',
      'Hang pictures and mirrors',
      'Fix a sticking {place} door',
      'Put up curtain rails',
      'Seal around the bath',
      'Small repairs around the {place}',
    ],
  },
];
export const SEED_CATEGORIES: readonly string[] = CATEGORIES.map((c) => c.name);

/** Provider ids are dealt round-robin over the trades, so a provider's trade follows from its id. */
const tradeOf = (providerId: number): Category => CATEGORIES[(providerId - 1) % CATEGORIES.length]!;

const QUOTE_COUNT_WEIGHTS = [10, 15, 20, 20, 15, 10, 10]; // index = number of quotes

function weightedPicker<T>(items: readonly T[], weightOf: (item: T) => number): (u: number) => T {
  const total = items.reduce((sum, item) => sum + weightOf(item), 0);
  const cumulative: number[] = [];
  let acc = 0;
  for (const item of items) {
    acc += weightOf(item) / total;
    cumulative.push(acc);
  }
  return (u) => {
    for (let i = 0; i < cumulative.length; i++) if (u < (cumulative[i] as number)) return items[i] as T;
    return items[items.length - 1] as T;
  };
}

function bulkInsert(db: Database, table: SeedTable): (rows: unknown[][]) => void {
  const columns = SEED_COLUMNS[table];
  const stmt = db.prepare(
    `seed.${table}`,
    `INSERT INTO ${table} (${columns.join(', ')}) SELECT ${columns.map((_, i) => `value ->> ${i}`).join(', ')} FROM json_each(?)`,
  );
  return (rows) => {
    if (rows.length > 0) stmt.run(JSON.stringify(rows));
  };
}

function assertCount(name: string, n: number, min: number): void {
  if (!Number.isSafeInteger(n) || n < min || n > 9_999_999_999) throw new RangeError(`${name} must be an integer from ${min}, got ${n}`);
}

/** Throws a RangeError naming the first count that is out of range. */
export function checkSeedOptions(options: SeedOptions): void {
  assertCount('consumers', options.consumers, 1);
  assertCount('providers', options.providers, 1);
  assertCount('requests', options.requests, 0);
}

export function seedMarketplace(db: Database, options: SeedOptions): SeedResult {
  checkSeedOptions(options);

  const existing = db.raw.prepare('SELECT (SELECT count(*) FROM consumers) + (SELECT count(*) FROM providers) AS n').get() as { n: number };
  if (existing.n > 0) throw new SeedTargetNotEmptyError('the marketplace tables already hold rows; seed an empty data dir');

  // The rows go in in id and time order, so indexes led by time, status,
  // category or request grow at a few right edges, which is cheap; those led by
  // consumer_id take inserts all over the b-tree. Those are dropped for the
  // load and built after it by one sort. A million requests, side by side:
  // 70 s keeping every index during the load, 31-43 s building all of them
  // after it, 29 s building only these after it. One transaction around
  // everything keeps that safe: a seed that fails or is killed leaves the
  // database as it was, indexes included.
  const indexes = db.raw
    .prepare(
      `SELECT m.name, m.sql FROM sqlite_master m, pragma_index_info(m.name) i
       WHERE m.type = 'index' AND m.sql IS NOT NULL AND i.seqno = 0 AND i.name = 'consumer_id'
         AND m.tbl_name IN ('consumers', 'providers', 'requests', 'quotes', 'bookings')`,
    )
    .all() as { name: string; sql: string }[];
  return db.transaction(() => {
    for (const index of indexes) db.raw.exec(`DROP INDEX ${index.name}`);
    const result = load(db, options);
    for (const index of indexes) db.raw.exec(index.sql);
    return result;
  });
}

/** The tables a seed fills, in load order, and the columns it gives each (quote ids are left to the database). */
export const SEED_COLUMNS = {
  consumers: ['consumer_id', 'name'],
  providers: ['provider_id', 'name', 'rating'],
  requests: ['request_id', 'consumer_id', 'title', 'category', 'status', 'created_at'],
  quotes: ['request_id', 'provider_id', 'price_cents'],
  bookings: ['booking_id', 'request_id', 'consumer_id', 'provider_id', 'status', 'scheduled_at', 'price_cents'],
} as const;
export type SeedTable = keyof typeof SEED_COLUMNS;

/** Rows for one insert statement; `requestsDone` on the last batch of each block of requests. */
export interface SeedBatch {
  table: SeedTable;
  rows: unknown[][];
  requestsDone?: number;
}

/** One SQLite insert per batch of the generated data set. */
function load(db: Database, options: SeedOptions): SeedResult {
  const insert = Object.fromEntries(Object.keys(SEED_COLUMNS).map((table) => [table, bulkInsert(db, table as SeedTable)])) as Record<
    SeedTable,
    (rows: unknown[][]) => void
  >;
  const batches = generateMarketplace(options);
  for (let next = batches.next(); ; next = batches.next()) {
    if (next.done) return next.value;
    insert[next.value.table](next.value.rows);
    if (next.value.requestsDone !== undefined) options.onProgress?.(next.value.requestsDone);
  }
}

/**
 * The data set, as batches of rows in load order (any engine inserts them):
 * the same options give the same batches.
 */
export function* generateMarketplace(options: SeedOptions): Generator<SeedBatch, SeedResult> {
  const rnd = createRandom(options.seed ?? 1);
  const endMs = options.endMs ?? SEED_END_MS;
  const spanMs = options.spanMs ?? 730 * DAY_MS;
  const batchSize = options.batchSize ?? 10_000;

  const name = (): string => `${FIRST_NAMES[rnd.int(FIRST_NAMES.length)]} ${LAST_NAMES[rnd.int(LAST_NAMES.length)]}`;
  for (let start = 1; start <= options.consumers; start += batchSize) {
    const rows: unknown[][] = [];
    for (let id = start; id < start + batchSize && id <= options.consumers; id++) rows.push([id, name()]);
    yield { table: 'consumers', rows };
  }
  for (let start = 1; start <= options.providers; start += batchSize) {
    const rows: unknown[][] = [];
    for (let id = start; id < start + batchSize && id <= options.providers; id++) {
      const trade = tradeOf(id).trade;
      const providerName = `${LAST_NAMES[rnd.int(LAST_NAMES.length)]} ${trade}${PROVIDER_SUFFIXES[rnd.int(PROVIDER_SUFFIXES.length)]}`;
      // Ratings cluster high, as on real marketplaces: 5 minus a half-normal-ish spread.
      const spread = Math.abs(rnd.next() + rnd.next() + rnd.next() - 1.5) * 1.6;
      rows.push([id, providerName, Math.round(Math.max(1, 5 - spread) * 10) / 10]);
    }
    yield { table: 'providers', rows };
  }

  const pickCategory = weightedPicker(
    CATEGORIES.map((_, i) => i),
    (i) => CATEGORIES[i]!.weight,
  );
  const pickQuoteCount = weightedPicker(
    QUOTE_COUNT_WEIGHTS.map((_, i) => i),
    (i) => QUOTE_COUNT_WEIGHTS[i] as number,
  );
  // u^2 and u^1.5: a few heavy consumers and busy providers, a long tail of light ones.
  const pickConsumer = (): number => 1 + Math.floor(options.consumers * rnd.next() ** 2);
  const anyProvider = (): number => 1 + Math.floor(options.providers * rnd.next() ** 1.5);
  // Most quotes come from providers of the request's trade, some from generalists of other trades.
  const tradeProvider = (categoryIndex: number): number => {
    const inTrade = Math.floor((options.providers - 1 - categoryIndex) / CATEGORIES.length) + 1;
    if (inTrade <= 0 || rnd.next() < 0.15) return anyProvider();
    return categoryIndex + 1 + CATEGORIES.length * Math.floor(inTrade * rnd.next() ** 1.5);
  };
  const startMs = endMs - spanMs;
  const meanGapMs = options.requests > 0 ? spanMs / options.requests : 0;

  let quotes = 0;
  let bookingId = 0;
  for (let start = 1; start <= options.requests; start += batchSize) {
    const requestRows: unknown[][] = [];
    const quoteRows: unknown[][] = [];
    const bookingRows: unknown[][] = [];
    for (let requestId = start; requestId < start + batchSize && requestId <= options.requests; requestId++) {
      // Strictly increasing before rounding down to whole seconds, so created_at never goes back but can tie.
      const createdAt = Math.floor((startMs + (requestId - 1 + rnd.next()) * meanGapMs) / 1000) * 1000;
      const consumerId = pickConsumer();
      const categoryIndex = pickCategory(rnd.next());
      const category = CATEGORIES[categoryIndex]!;
      const title = category.titles[rnd.int(category.titles.length)]!.replace('{place}', PLACES[rnd.int(PLACES.length)]!);
      const jobCents = category.baseCents * (0.6 + rnd.next() * 1.2);

      const quoteCount = Math.min(pickQuoteCount(rnd.next()), options.providers);
      const quoted: { providerId: number; priceCents: number }[] = [];
      while (quoted.length < quoteCount) {
        const providerId = tradeProvider(categoryIndex);
        if (quoted.some((q) => q.providerId === providerId)) continue;
        quoted.push({ providerId, priceCents: Math.max(100, Math.round((jobCents * (0.75 + rnd.next() * 0.5)) / 100) * 100) });
      }

      const bookings: { providerId: number; status: BookingStatus; scheduledAt: number; priceCents: number }[] = [];
      if (quoted.length > 0 && rnd.next() < 0.5) {
        const candidates = quoted.slice();
        let earliestDay = Math.floor(createdAt / DAY_MS) + 1;
        while (candidates.length > 0) {
          const chosen = candidates.splice(rnd.int(candidates.length), 1)[0]!;
          const day = earliestDay + rnd.int(21);
          const scheduledAt = day * DAY_MS + (8 * 60 + rnd.int(20) * 30) * 60_000; // 08:00-17:30, half-hour slots
          const u = rnd.next();
          const status: BookingStatus = scheduledAt < endMs ? (u < 0.9 ? 'completed' : 'cancelled') : u < 0.4 ? 'pending' : u < 0.9 ? 'confirmed' : 'cancelled';
          bookings.push({ providerId: chosen.providerId, status, scheduledAt, priceCents: chosen.priceCents });
          // Half of the cancelled bookings are rebooked with another quoting provider, later.
          if (status !== 'cancelled' || rnd.next() < 0.5) break;
          earliestDay = day + 1;
        }
      }

      let status: RequestStatus;
      if (bookings.some((b) => b.status !== 'cancelled')) status = 'booked';
      else if (endMs - createdAt < 14 * DAY_MS) status = rnd.next() < 0.9 ? 'open' : 'closed';
      else status = rnd.next() < 0.2 ? 'open' : 'closed';

      requestRows.push([requestId, consumerId, title, category.name, status, createdAt]);
      for (const q of quoted) quoteRows.push([requestId, q.providerId, q.priceCents]);
      quotes += quoted.length;
      for (const b of bookings) bookingRows.push([++bookingId, requestId, consumerId, b.providerId, b.status, b.scheduledAt, b.priceCents]);
    }
    yield { table: 'requests', rows: requestRows };
    yield { table: 'quotes', rows: quoteRows };
    yield { table: 'bookings', rows: bookingRows, requestsDone: Math.min(start + batchSize - 1, options.requests) };
  }
  return { consumers: options.consumers, providers: options.providers, requests: options.requests, quotes, bookings: bookingId };
}
