import assert from 'node:assert/strict';
import { test } from 'node:test';
import { randomBase64url, timeOrderedId } from '../../src/random-id.js';

test('randomBase64url: the requested number of random bytes, never the same twice', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 5000; i++) {
    const id = randomBase64url(12);
    assert.equal(Buffer.from(id, 'base64url').length, 12);
    seen.add(id);
  }
  assert.equal(seen.size, 5000);
  assert.throws(() => randomBase64url(0), RangeError);
  assert.throws(() => randomBase64url(257), RangeError);
});

test('timeOrderedId: prefix, the time as 9 base-36 digits, then the random bytes', (t) => {
  t.mock.timers.enable({ apis: ['Date'], now: Date.UTC(2026, 0, 5, 9, 30) });
  const id = timeOrderedId('task_', 16);
  const match = /^task_([0-9a-z]{9})([A-Za-z0-9_-]+)$/.exec(id);
  assert.ok(match, id);
  assert.equal(parseInt(match[1]!, 36), Date.UTC(2026, 0, 5, 9, 30));
  assert.equal(Buffer.from(match[2]!, 'base64url').length, 16);
});

test('timeOrderedId: ids made later sort after earlier ones as text, across digit carries', (t) => {
  // Padded to 9 digits, the text order is the time order, also where a ninth digit appears (36^8 ms, in 2059).
  t.mock.timers.enable({ apis: ['Date'], now: 36 ** 8 - 1 });
  const ids: string[] = [];
  for (const step of [1, 1, 35, 36 ** 2, 86_400_000, 1]) {
    ids.push(timeOrderedId('msg_', 12));
    t.mock.timers.tick(step);
  }
  ids.push(timeOrderedId('msg_', 12));
  assert.deepEqual([...ids].sort(), ids);
  assert.equal(new Set(ids).size, ids.length);
});
