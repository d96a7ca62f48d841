import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createEgressLimits } from '../../src/limits/egress.js';
import { createPendingAdmission } from '../../src/transport/admission.js';

test('pending admission: per-address share, then the total, each slot freed once, nothing kept for idle addresses', () => {
  let nearFds = false;
  const a = createPendingAdmission({ maxPending: 5, maxPendingPerAddress: 3, retryAfterMs: 1000, nearFdLimit: () => nearFds });
  const slots = [1, 2, 3].map(() => a.admit('10.0.0.1'));
  assert.ok(slots.every((s) => s.ok));
  const fourth = a.admit('10.0.0.1');
  assert.ok(!fourth.ok);
  assert.equal(fourth.error.code, 'rate_limited');
  assert.equal(fourth.error.retryAfterMs, 1000);
  assert.equal(fourth.closeConnection, false);
  assert.ok(a.admit('10.0.0.2').ok);
  const other = a.admit('10.0.0.3');
  assert.ok(other.ok);
  const full = a.admit('10.0.0.4');
  assert.ok(!full.ok);
  assert.equal(full.error.code, 'overloaded');
  assert.equal(a.pending(), 5);

  // A slot released twice frees one place.
  const first = slots[0];
  assert.ok(first?.ok);
  first.slot.release();
  first.slot.release();
  assert.equal(a.pending(), 4);
  assert.equal(a.pending('10.0.0.1'), 2);
  other.slot.release();
  assert.equal(a.pending('10.0.0.3'), 0);

  // Near the descriptor limit every new connection is refused, and its answer closes the connection.
  nearFds = true;
  const refused = a.admit('10.0.0.9');
  assert.ok(!refused.ok);
  assert.equal(refused.error.code, 'overloaded');
  assert.equal(refused.closeConnection, true);
  assert.equal(a.closesConnection(refused.error), true);
  assert.equal(a.closesConnection(full.error), false);
  a.close();
});

test('egress: bytes pass while the bucket holds them, then wait exactly retryAfterMs; a reply larger than the bucket puts the user in debt', () => {
  let t = 0;
  const e = createEgressLimits({ bytesPerMinute: 60_000, now: () => t });
  assert.deepEqual(e.charge('u', 50_000), { ok: true });
  const refused = e.charge('u', 20_000);
  assert.ok(!refused.ok);
  // 10,000 bytes left; 10,000 more drip in at 1 byte per ms.
  assert.equal(refused.retryAfterMs, 10_000);
  t += 9_999;
  assert.equal(e.charge('u', 20_000).ok, false);
  t += 1;
  assert.equal(e.charge('u', 20_000).ok, true);
  // Other users have buckets of their own.
  assert.equal(e.charge('v', 60_000).ok, true);

  // 150,000 bytes: a full bucket is taken, and the 90,000 past it are owed.
  t += 60_000;
  assert.equal(e.charge('w', 150_000).ok, true);
  const owed = e.charge('w', 1);
  assert.ok(!owed.ok);
  assert.equal(owed.retryAfterMs, 90_001);
  assert.equal(e.size(), 3);
  e.close();
});

test('egress: idle users with a full bucket are dropped, and come back with a full one', () => {
  let t = 0;
  const e = createEgressLimits({ bytesPerMinute: 60_000, idleMs: 120_000, now: () => t });
  for (let i = 0; i < 1000; i++) e.charge(`user${i}`, 1000);
  assert.equal(e.sweep(), 0);
  t += 120_000;
  assert.equal(e.sweep(), 1000);
  assert.equal(e.size(), 0);
  assert.equal(e.charge('user1', 60_000).ok, true);
  e.close();
});
