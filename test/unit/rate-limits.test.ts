import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import fc from 'fast-check';
import { createRateLimits, type Decision, type RateLimits, type RateLimitsOptions, type ReserveResult } from '../../src/limits/rate-limits.js';
import { retryAfterSeconds } from '../../src/limits/ratelimit-headers.js';
import { ClockedBucket, policy } from '../../src/limits/token-bucket.js';

/** A clock the test moves by hand: every figure below is exact because no real time passes. */
function manualClock(start = 1_000) {
  let t = start;
  return {
    now: () => t,
    advance: (ms: number) => {
      t += ms;
    },
  };
}

function withLimits(overrides: Partial<RateLimitsOptions>, run: (limits: RateLimits, clock: ReturnType<typeof manualClock>) => void): void {
  const clock = manualClock();
  const limits = createRateLimits({
    messagesPerSecond: 50,
    chatsPerMinute: 60,
    modelTokensPerMinute: 20_000,
    maxConnectionsPerUser: 16,
    now: clock.now,
    ...overrides,
  });
  try {
    run(limits, clock);
  } finally {
    limits.close();
  }
}

test('a user gets a burst of messagesPerSecond frames, then rate_limited with the exact wait', () => {
  withLimits({}, (limits, clock) => {
    assert.deepEqual(limits.frame('alice'), { ok: true, info: { limit: 50, remaining: 49, resetMs: 20 } });
    for (let i = 0; i < 49; i++) assert.equal(limits.frame('alice').ok, true);
    assert.deepEqual(limits.frame('alice'), {
      ok: false,
      bucket: 'messages',
      retryAfterMs: 20,
      info: { limit: 50, remaining: 0, resetMs: 1000 },
    });
    clock.advance(19);
    const early = limits.frame('alice');
    assert.equal(early.ok, false);
    assert.equal(!early.ok && early.retryAfterMs, 1);
    clock.advance(1);
    assert.deepEqual(limits.frame('alice'), { ok: true, info: { limit: 50, remaining: 0, resetMs: 1000 } });
  });
});

test("all of a user's connections share one frame bucket; other users are not affected", () => {
  withLimits({ messagesPerSecond: 4 }, (limits) => {
    assert.equal(limits.connectionOpened('alice').ok, true);
    assert.equal(limits.connectionOpened('alice').ok, true);
    // Two sockets of alice alternate frames: together they get 4, not 4 each.
    const results = [1, 2, 3, 4, 5].map(() => limits.frame('alice').ok);
    assert.deepEqual(results, [true, true, true, true, false]);
    assert.deepEqual(limits.frame('bob'), { ok: true, info: { limit: 4, remaining: 3, resetMs: 250 } });
  });
});

test('chats are limited per minute, with retryAfterMs to the millisecond', () => {
  withLimits({ chatsPerMinute: 3 }, (limits, clock) => {
    assert.deepEqual(limits.chat('alice'), { ok: true, info: { limit: 3, remaining: 2, resetMs: 20_000 } });
    assert.equal(limits.chat('alice').ok, true);
    assert.deepEqual(limits.chat('alice'), { ok: true, info: { limit: 3, remaining: 0, resetMs: 60_000 } });
    assert.deepEqual(limits.chat('alice'), {
      ok: false,
      bucket: 'chats',
      retryAfterMs: 20_000,
      info: { limit: 3, remaining: 0, resetMs: 60_000 },
    });
    clock.advance(19_999);
    assert.deepEqual(limits.chat('alice'), { ok: false, bucket: 'chats', retryAfterMs: 1, info: { limit: 3, remaining: 0, resetMs: 40_001 } });
    clock.advance(1);
    assert.deepEqual(limits.chat('alice'), { ok: true, info: { limit: 3, remaining: 0, resetMs: 60_000 } });
    // Frames and chats are separate buckets.
    assert.equal(limits.frame('alice').ok, true);
  });
});

test('retrying after retryAfterMs always succeeds, and one ms earlier never does (any rate, any history)', () => {
  const op = fc.constantFrom('frame' as const, 'chat' as const, 'tokens' as const);
  let refusals = 0;
  fc.assert(
    fc.property(
      fc.double({ min: 0.1, max: 500, noNaN: true }),
      fc.double({ min: 0.1, max: 500, noNaN: true }),
      fc.integer({ min: 1, max: 50_000 }),
      fc.array(fc.tuple(op, fc.integer({ min: 0, max: 3000 }), fc.integer({ min: 1, max: 5000 })), { minLength: 1, maxLength: 60 }),
      (messagesPerSecond, chatsPerMinute, modelTokensPerMinute, steps) => {
        withLimits({ messagesPerSecond, chatsPerMinute, modelTokensPerMinute, idleMs: 3_600_000_000 }, (limits, clock) => {
          const attempt = (kind: 'frame' | 'chat' | 'tokens', maxTokens: number): Decision | ReserveResult =>
            kind === 'frame' ? limits.frame('u') : kind === 'chat' ? limits.chat('u') : limits.reserveModelTokens('u', maxTokens);
          for (const [kind, waitMs, maxTokens] of steps) {
            clock.advance(waitMs);
            const first = attempt(kind, maxTokens);
            if (first.ok) {
              if ('reservation' in first) first.reservation.settle(Math.floor(maxTokens / 2));
              continue;
            }
            refusals += 1;
            assert.ok(first.retryAfterMs >= 1);
            clock.advance(first.retryAfterMs - 1);
            const early = attempt(kind, maxTokens);
            assert.equal(early.ok, false, `${kind} passed 1 ms before retryAfterMs`);
            clock.advance(1);
            const retried = attempt(kind, maxTokens);
            assert.equal(retried.ok, true, `${kind} refused after waiting retryAfterMs=${first.retryAfterMs}`);
            if (retried.ok && 'reservation' in retried) retried.reservation.settle(maxTokens);
          }
        });
      },
    ),
    { numRuns: 300 },
  );
  assert.ok(refusals > 100, `only ${refusals} refusals were exercised`);
});

test('model tokens are reserved at send and the unused part is refunded at settle, once', () => {
  withLimits({ modelTokensPerMinute: 1000 }, (limits) => {
    const r = limits.reserveModelTokens('alice', 300);
    assert.ok(r.ok);
    assert.equal(r.reservation.reserved, 300);
    assert.deepEqual(r.info, { limit: 1000, remaining: 700, resetMs: 18_000 });
    r.reservation.settle(100);
    assert.deepEqual(limits.peek('alice', 'tokens'), { limit: 1000, remaining: 900, resetMs: 6_000 });
    r.reservation.settle(0);
    r.reservation.release();
    assert.equal(limits.peek('alice', 'tokens').remaining, 900, 'a second settle or release changes nothing');
  });
});

test('release gives a reservation back whole; a refund never exceeds the reservation or the capacity', () => {
  withLimits({ modelTokensPerMinute: 1000 }, (limits, clock) => {
    const a = limits.reserveModelTokens('alice', 400);
    assert.ok(a.ok);
    a.reservation.release();
    assert.deepEqual(limits.peek('alice', 'tokens'), { limit: 1000, remaining: 1000, resetMs: 0 });

    const b = limits.reserveModelTokens('alice', 400);
    assert.ok(b.ok);
    clock.advance(60_000); // refilled to full meanwhile
    b.reservation.settle(0);
    assert.equal(limits.peek('alice', 'tokens').remaining, 1000);

    const c = limits.reserveModelTokens('alice', 400);
    assert.ok(c.ok);
    c.reservation.settle(-5); // a broken usage figure is charged as the whole reservation
    assert.equal(limits.peek('alice', 'tokens').remaining, 600);
    const d = limits.reserveModelTokens('alice', 100);
    assert.ok(d.ok);
    d.reservation.settle(Number.NaN);
    assert.equal(limits.peek('alice', 'tokens').remaining, 500);
  });
});

test('a reservation past the remaining budget is refused with the wait for exactly that many tokens', () => {
  withLimits({ modelTokensPerMinute: 1000 }, (limits, clock) => {
    const a = limits.reserveModelTokens('alice', 900);
    assert.ok(a.ok);
    const refused = limits.reserveModelTokens('alice', 250);
    assert.deepEqual(refused, { ok: false, bucket: 'tokens', retryAfterMs: 9_000, info: { limit: 1000, remaining: 100, resetMs: 54_000 } });
    clock.advance(9_000);
    assert.equal(limits.reserveModelTokens('alice', 250).ok, true);
  });
});

test('usage past the reservation is charged as debt, so a stream cannot overrun the budget', () => {
  withLimits({ modelTokensPerMinute: 1000 }, (limits, clock) => {
    // maxTokens above the whole budget: a full bucket is reserved, the rest is charged at settle.
    const r = limits.reserveModelTokens('alice', 5000);
    assert.ok(r.ok);
    assert.equal(r.reservation.reserved, 1000);
    r.reservation.settle(4000);
    assert.deepEqual(limits.peek('alice', 'tokens'), { limit: 1000, remaining: 0, resetMs: 240_000 });
    // 3000 tokens of debt plus 1 token to reserve: 3001 tokens at 1000/min.
    assert.deepEqual(limits.reserveModelTokens('alice', 1), {
      ok: false,
      bucket: 'tokens',
      retryAfterMs: 180_060,
      info: { limit: 1000, remaining: 0, resetMs: 240_000 },
    });
    // A user in debt is kept past idleMs: dropping it would forgive the debt.
    clock.advance(150_000);
    assert.equal(limits.sweep(), 0);
    assert.equal(limits.size(), 1);
    clock.advance(90_000);
    assert.equal(limits.sweep(), 1);
    assert.equal(limits.size(), 0);
  });
});

test("usage above the chat's maxTokens is charged as maxTokens: a bogus report cannot shut a user out for days", () => {
  withLimits({ modelTokensPerMinute: 1000 }, (limits) => {
    const r = limits.reserveModelTokens('alice', 100);
    assert.ok(r.ok);
    r.reservation.settle(1e16);
    assert.deepEqual(limits.peek('alice', 'tokens'), { limit: 1000, remaining: 900, resetMs: 6_000 });
  });
});

test('a wait past 2^53 ms is answered at once instead of walked a millisecond at a time', { timeout: 10_000 }, () => {
  const clock = manualClock();
  const bucket = new ClockedBucket(policy(20_000, 60_000), clock.now);
  bucket.adjust(-1e20);
  for (const wait of [bucket.msUntilAvailable(1), bucket.msUntilNextUnit(), bucket.msUntilFull()]) {
    assert.ok(wait > Number.MAX_SAFE_INTEGER && Number.isFinite(wait), String(wait));
  }
});

test('connections past maxConnectionsPerUser are refused with a reason; closing frees a slot', () => {
  withLimits({ maxConnectionsPerUser: 2 }, (limits) => {
    assert.deepEqual(limits.connectionOpened('alice'), { ok: true, open: 1, limit: 2 });
    assert.deepEqual(limits.connectionOpened('alice'), { ok: true, open: 2, limit: 2 });
    assert.deepEqual(limits.connectionOpened('alice'), {
      ok: false,
      open: 2,
      limit: 2,
      reason: 'too many connections for this user: 2 open, at most 2 allowed',
    });
    assert.deepEqual(limits.connectionOpened('bob'), { ok: true, open: 1, limit: 2 });
    limits.connectionClosed('alice');
    assert.deepEqual(limits.connectionOpened('alice'), { ok: true, open: 2, limit: 2 });
    // Extra closes (and closes of unknown users) never free slots that were not held.
    for (let i = 0; i < 5; i++) limits.connectionClosed('alice');
    limits.connectionClosed('nobody');
    assert.equal(limits.connectionOpened('alice').ok, true);
    assert.equal(limits.connectionOpened('alice').ok, true);
    assert.equal(limits.connectionOpened('alice').ok, false);
  });
});

test('users idle for idleMs are dropped, except those with open connections or reservations', () => {
  withLimits({ idleMs: 120_000 }, (limits, clock) => {
    limits.frame('idle');
    limits.chat('idle');
    limits.connectionOpened('connected');
    const held = limits.reserveModelTokens('reserving', 32);
    assert.ok(held.ok);
    assert.equal(limits.size(), 3);

    clock.advance(119_999);
    assert.equal(limits.sweep(), 0);
    clock.advance(1);
    // Its buckets refilled long ago: coming back as a new user gives it nothing extra.
    assert.deepEqual(limits.peek('idle', 'chats'), { limit: 60, remaining: 60, resetMs: 0 });
    assert.equal(limits.sweep(), 1);
    assert.equal(limits.size(), 2);

    limits.connectionClosed('connected');
    held.reservation.settle(10);
    clock.advance(120_000);
    assert.equal(limits.sweep(), 2);
    assert.equal(limits.size(), 0);
  });
});

test('anonymous users are bounded: past maxAnonymousUsers new ones are refused until the sweep drops idle ones; named users do not count', () => {
  withLimits({ idleMs: 120_000, maxAnonymousUsers: 2 }, (limits, clock) => {
    assert.equal(limits.admitAnonymous('anon-a'), true);
    assert.equal(limits.admitAnonymous('anon-b'), true);
    assert.equal(limits.admitAnonymous('anon-c'), false);
    // One already tracked comes back in: the bound is on distinct users, not on calls.
    assert.equal(limits.admitAnonymous('anon-a'), true);
    // A refused one was not tracked, and named users come and go as before.
    assert.equal(limits.size(), 2);
    assert.ok(limits.chat('alice').ok);
    assert.equal(limits.size(), 3);
    assert.equal(limits.admitAnonymous('anon-c'), false);

    // anon-b holds a connection, so only anon-a and alice are dropped.
    assert.ok(limits.connectionOpened('anon-b').ok);
    clock.advance(120_000);
    assert.equal(limits.sweep(), 2);
    assert.equal(limits.admitAnonymous('anon-c'), true);
    assert.equal(limits.admitAnonymous('anon-a'), false);
  });
  // Unset: no bound.
  withLimits({}, (limits) => {
    for (let i = 0; i < 1000; i++) assert.equal(limits.admitAnonymous(`anon-${i}`), true);
  });
  assert.throws(
    () => createRateLimits({ messagesPerSecond: 1, chatsPerMinute: 1, modelTokensPerMinute: 1, maxConnectionsPerUser: 1, maxAnonymousUsers: 0 }),
    RangeError,
  );
});

test('a user seen again is not dropped: idleness counts from the last check', () => {
  withLimits({ idleMs: 120_000 }, (limits, clock) => {
    limits.frame('alice');
    clock.advance(100_000);
    limits.frame('alice');
    clock.advance(100_000);
    assert.equal(limits.sweep(), 0);
    clock.advance(20_000);
    assert.equal(limits.sweep(), 1);
  });
});

test('idleMs shorter than the longest refill is refused, so dropping a bucket never grants extra', () => {
  const base = { messagesPerSecond: 50, chatsPerMinute: 60, modelTokensPerMinute: 20_000, maxConnectionsPerUser: 4 };
  assert.throws(() => createRateLimits({ ...base, idleMs: 59_999 }), /idleMs \(59999\) must be at least the longest bucket refill time \(60000 ms\)/);
  // 0.25 chats per minute: a bucket of 1 takes 4 minutes to refill; the default idleMs follows.
  const slow = createRateLimits({ ...base, chatsPerMinute: 0.25 });
  slow.close();
  assert.throws(() => createRateLimits({ ...base, chatsPerMinute: 0.25, idleMs: 120_000 }), /240000 ms/);
  assert.throws(() => createRateLimits({ ...base, messagesPerSecond: 0 }), RangeError);
  assert.throws(() => createRateLimits({ ...base, maxConnectionsPerUser: 0 }), RangeError);
});

test('a fractional rate still lets a whole unit through and waits the right time for the next', () => {
  withLimits({ messagesPerSecond: 0.5 }, (limits) => {
    assert.deepEqual(limits.frame('alice'), { ok: true, info: { limit: 1, remaining: 0, resetMs: 2000 } });
    assert.deepEqual(limits.frame('alice'), { ok: false, bucket: 'messages', retryAfterMs: 2000, info: { limit: 1, remaining: 0, resetMs: 2000 } });
    assert.match(limits.httpHeaders('alice')['RateLimit-Policy'], /^"messages";q=1;w=2, /);
  });
});

test('the sweep runs on its own timer', async () => {
  const clock = manualClock();
  const limits = createRateLimits({
    messagesPerSecond: 50,
    chatsPerMinute: 60,
    modelTokensPerMinute: 20_000,
    maxConnectionsPerUser: 4,
    idleMs: 60_000,
    sweepIntervalMs: 5,
    now: clock.now,
  });
  try {
    limits.frame('alice');
    clock.advance(60_000);
    for (let i = 0; i < 400 && limits.size() > 0; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(limits.size(), 0);
  } finally {
    limits.close();
  }
});

test('HTTP responses carry the IETF RateLimit-Policy and RateLimit fields', () => {
  withLimits({ chatsPerMinute: 3 }, (limits) => {
    const policy = '"messages";q=50;w=1, "chats";q=3;w=60, "tokens";q=20000;w=60;chatwire-unit="model-tokens"';
    assert.deepEqual(limits.httpHeaders('nobody'), {
      'RateLimit-Policy': policy,
      RateLimit: '"messages";r=50;t=1, "chats";r=3;t=20, "tokens";r=20000;t=1',
    });
    assert.equal(limits.size(), 0, 'reading the headers of an unknown user tracks nothing');

    limits.frame('alice');
    limits.chat('alice');
    limits.chat('alice');
    limits.chat('alice');
    const refused = limits.chat('alice');
    assert.ok(!refused.ok);
    const headers = limits.httpHeaders('alice');
    assert.equal(headers['RateLimit-Policy'], policy);
    assert.equal(headers.RateLimit, '"messages";r=49;t=1, "chats";r=0;t=20, "tokens";r=20000;t=1');
    // The draft: Retry-After must not point before the end of the effective window t.
    assert.equal(retryAfterSeconds(refused.retryAfterMs), 20);
    // A caller that could not be identified holds no bucket: the fields of a user never charged, whoever is tracked.
    assert.deepEqual(limits.httpHeaders(null), {
      'RateLimit-Policy': policy,
      RateLimit: '"messages";r=50;t=1, "chats";r=3;t=20, "tokens";r=20000;t=1',
    });
    assert.equal(limits.size(), 1, 'and tracks nothing');
  });
});

test('Retry-After rounds up to whole seconds', () => {
  assert.equal(retryAfterSeconds(1), 1);
  assert.equal(retryAfterSeconds(1000), 1);
  assert.equal(retryAfterSeconds(1001), 2);
  assert.equal(retryAfterSeconds(0), 0);
});

test('close() stops the sweep timer and forgets every user', () => {
  withLimits({}, (limits) => {
    limits.frame('alice');
    limits.close();
    limits.close();
    assert.equal(limits.size(), 0);
  });
});

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) {
    gc();
    return;
  }
  // Not run with --expose-gc: turn it on for a fresh context and take its gc function.
  setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

test('200,000 distinct users: tracked count and heap fall back after the sweep', () => {
  withLimits({}, (limits, clock) => {
    collectGarbage();
    const heapBefore = process.memoryUsage().heapUsed;
    const users = 200_000;
    for (let i = 0; i < users; i++) {
      const userId = `user-${i}`;
      limits.frame(userId);
      if (i % 10 === 0) limits.chat(userId);
    }
    limits.connectionOpened('user-7');
    assert.equal(limits.size(), users);
    collectGarbage();
    const heapFull = process.memoryUsage().heapUsed;

    clock.advance(120_000);
    assert.equal(limits.sweep(), users - 1);
    assert.equal(limits.size(), 1, 'only the user with an open connection stays');
    collectGarbage();
    const heapAfter = process.memoryUsage().heapUsed;

    const perUserBytes = (heapFull - heapBefore) / users;
    assert.ok(perUserBytes < 1024, `each tracked user costs ${Math.round(perUserBytes)} bytes`);
    assert.ok(heapAfter - heapBefore < 8 * 1024 * 1024, `heap grew by ${heapAfter - heapBefore} bytes after the sweep`);
  });
});

let lastReason = '';
/** The wait of a refused connection (failing the test if it was admitted or refused without one). */
function refusedFor(decision: ReturnType<RateLimits['connectionOpened']>): number {
  assert.equal(decision.ok, false, 'the connection is refused');
  if (decision.ok) return NaN;
  lastReason = decision.reason;
  assert.equal(typeof decision.retryAfterMs, 'number', 'with a retryAfterMs');
  return decision.retryAfterMs as number;
}

test('a connection closed for flooding holds the user back 1 s, doubling per flood up to 60 s, forgotten after 10 quiet minutes', () => {
  withLimits({}, (limits, clock) => {
    const waits: number[] = [];
    for (let flood = 0; flood < 9; flood++) {
      assert.equal(limits.connectionOpened('flooder').ok, true);
      limits.floodClosed('flooder');
      limits.connectionClosed('flooder');
      const wait = refusedFor(limits.connectionOpened('flooder'));
      waits.push(wait);
      assert.match(lastReason, new RegExp(`closed for sending past its rate limit; reconnect in ${wait} ms`));
      // One ms early is still refused; on time the user is back.
      clock.advance(wait - 1);
      assert.equal(limits.connectionOpened('flooder').ok, false);
      clock.advance(1);
      assert.equal(limits.connectionOpened('flooder').ok, true);
      limits.connectionClosed('flooder');
    }
    assert.deepEqual(waits, [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000]);
    // Other users were never held back.
    assert.equal(limits.connectionOpened('bystander').ok, true);
    // Ten quiet minutes after the last penalty ended, the strikes are forgotten.
    clock.advance(10 * 60_000 + 1);
    limits.floodClosed('flooder');
    assert.equal(refusedFor(limits.connectionOpened('flooder')), 1000);
  });
});

test('the flood penalty lasts at least until the frame bucket is full again', () => {
  withLimits({ messagesPerSecond: 0.5 }, (limits) => {
    // A bucket of one frame refilled at one every 2 s: emptied, it is full again only after 2000 ms.
    assert.equal(limits.frame('slow').ok, true);
    limits.floodClosed('slow');
    assert.equal(refusedFor(limits.connectionOpened('slow')), 2000);
  });
});

test('refused frames are counted per user over all its connections, in windows of a second', () => {
  withLimits({}, (limits, clock) => {
    for (let i = 1; i <= 300; i++) assert.equal(limits.frameRefused('flooder'), i);
    assert.equal(limits.frameRefused('bystander'), 1);
    clock.advance(1000);
    assert.equal(limits.frameRefused('flooder'), 301, 'still the same window');
    clock.advance(1);
    assert.equal(limits.frameRefused('flooder'), 1, 'a new window');
  });
});

test('connections closed for one flood spread over them are one strike: the penalty does not double per connection', () => {
  withLimits({}, (limits, clock) => {
    for (let i = 0; i < 16; i++) assert.equal(limits.connectionOpened('spread').ok, true);
    for (let i = 0; i < 16; i++) {
      limits.floodClosed('spread');
      limits.connectionClosed('spread');
    }
    assert.equal(refusedFor(limits.connectionOpened('spread')), 1000);
    clock.advance(1000);
    assert.equal(limits.connectionOpened('spread').ok, true);
    // A flood after the penalty ran out is a second strike.
    limits.floodClosed('spread');
    assert.equal(refusedFor(limits.connectionOpened('spread')), 2000);
  });
});
