import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { FairQueue } from '../../src/llm/fair-queue.js';

test('owners are served round-robin: one with a single item waits behind at most one item of each other owner', () => {
  const q = new FairQueue<string>();
  for (let i = 0; i < 100; i++) q.push('hog', `hog${i}`);
  q.push('one', 'one0');
  q.push('two', 'two0');
  q.push('two', 'two1');
  assert.equal(q.size, 103);
  assert.equal(q.owners, 3);
  assert.deepEqual([q.shift(), q.shift(), q.shift(), q.shift(), q.shift(), q.shift()], ['hog0', 'one0', 'two0', 'hog1', 'two1', 'hog2']);
  // Only the hog is left: its items in their order.
  assert.equal(q.owners, 1);
  assert.equal(q.count('hog'), 97);
  // A newcomer joins the ring at the back: it waits for at most one more of the hog's items.
  q.push('late', 'late0');
  assert.deepEqual([q.shift(), q.shift(), q.shift()], ['hog3', 'late0', 'hog4']);
  assert.equal(q.shift(), 'hog5');
});

test('remove takes out an item before its turn; an owner whose line empties leaves the ring', () => {
  const q = new FairQueue<{ n: number }>();
  const a = [{ n: 0 }, { n: 1 }];
  const b = { n: 2 };
  q.push('a', a[0]!);
  q.push('a', a[1]!);
  q.push('b', b);
  assert.equal(q.remove('a', a[0]!), true);
  assert.equal(q.remove('a', a[0]!), false);
  assert.equal(q.remove('c', b), false);
  assert.equal(q.count('a'), 1);
  assert.equal(q.remove('b', b), true);
  assert.equal(q.owners, 1);
  assert.equal(q.size, 1);
  assert.equal(q.shift(), a[1]);
  assert.equal(q.shift(), undefined);
  assert.equal(q.size, 0);
  assert.equal(q.owners, 0);
});

test('whatever is pushed, removed and shifted: every item comes out once, each owner in its own order, and no owner is served twice while another waits', () => {
  type Op = { kind: 'push'; owner: number } | { kind: 'shift' } | { kind: 'remove'; owner: number };
  const op = fc.oneof(
    fc.record({ kind: fc.constant('push' as const), owner: fc.integer({ min: 0, max: 4 }) }),
    fc.record({ kind: fc.constant('shift' as const) }),
    fc.record({ kind: fc.constant('remove' as const), owner: fc.integer({ min: 0, max: 4 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 200 }), (ops: Op[]) => {
      const q = new FairQueue<number>();
      const model = new Map<string, number[]>();
      let next = 0;
      // Owners served since each waiting owner was last served (or joined): never twice while one waits.
      const servedSince = new Map<string, Set<string>>();
      for (const o of ops) {
        if (o.kind === 'push') {
          const owner = `o${o.owner}`;
          q.push(owner, next);
          if (!model.has(owner)) {
            model.set(owner, []);
            servedSince.set(owner, new Set());
          }
          model.get(owner)!.push(next++);
        } else if (o.kind === 'remove') {
          const owner = `o${o.owner}`;
          const line = model.get(owner);
          if (!line || line.length === 0) continue;
          const item = line[line.length - 1]!;
          assert.equal(q.remove(owner, item), true);
          line.pop();
          if (line.length === 0) {
            model.delete(owner);
            servedSince.delete(owner);
          }
        } else {
          const item = q.shift();
          if (model.size === 0) {
            assert.equal(item, undefined);
            continue;
          }
          const owner = [...model.entries()].find(([, line]) => line[0] === item)?.[0];
          assert.ok(owner !== undefined, `item ${item} was not the oldest of any owner`);
          for (const [other, seen] of servedSince) {
            if (other === owner) continue;
            assert.ok(!seen.has(owner), `${owner} served twice while ${other} waited`);
            seen.add(owner);
          }
          servedSince.set(owner, new Set());
          const line = model.get(owner)!;
          line.shift();
          if (line.length === 0) {
            model.delete(owner);
            servedSince.delete(owner);
          }
        }
        assert.equal(
          q.size,
          [...model.values()].reduce((n, l) => n + l.length, 0),
        );
        assert.equal(q.owners, model.size);
      }
      const rest = q.drain();
      assert.deepEqual(
        [...rest].sort((x, y) => x - y),
        [...model.values()].flat().sort((x, y) => x - y),
      );
      assert.equal(q.size, 0);
    }),
  );
});
