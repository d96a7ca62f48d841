import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { PumpScheduler, Task, type Sink } from '../../src/chat/task.js';
import type { ServerMessage } from '../../src/protocol/index.js';

/** A peer that records what it is sent and in which corked write. */
function peer(options: { congested?: () => boolean } = {}) {
  const writes: ServerMessage[][] = [];
  let open: ServerMessage[] | null = null;
  const sink: Sink = {
    deliver(m) {
      if (open) open.push(m);
      else writes.push([m]);
      return true;
    },
    congested: options.congested ?? (() => false),
    cork(fn) {
      open = [];
      fn();
      if (open.length > 0) writes.push(open);
      open = null;
    },
  };
  return { sink, writes, frames: () => writes.flat() };
}

// The chat service's scheduler of live deltas, shared by its tasks.
const pumps = new PumpScheduler();

function newTask(id = 't1'): Task {
  return new Task(id, 'u1', 'c1', performance.now(), Date.now(), false, pumps);
}

const doneOf = (taskId: string) =>
  ({
    type: 'chat.done',
    taskId,
    messageId: 'm1',
    finishReason: 'stop',
    usage: { promptTokens: 1, completionTokens: 1 },
    cached: false,
    timings: { queueMs: 0, firstTokenMs: 0, totalMs: 0 },
  }) as const;

const deltaTexts = (frames: ServerMessage[]) => frames.filter((m) => m.type === 'chat.delta').map((m) => (m as { text: string }).text);

test('chunks that arrive in one turn reach a ready peer as one frame each, in one corked write, after the turn', async () => {
  const task = newTask();
  const p = peer();
  task.subscribe(p.sink, 0).pump();
  task.pushDelta('Hello');
  task.pushDelta(' there');
  task.pushDelta(' friend');
  assert.equal(p.frames().length, 0, 'nothing is written while the turn is still running');
  await nextTurn();
  assert.deepEqual(deltaTexts(p.frames()), ['Hello', ' there', ' friend']);
  assert.deepEqual(
    p.frames().map((m) => (m as { seq: number }).seq),
    [0, 1, 2],
  );
  assert.equal(p.writes.length, 1, 'one write for the whole turn');
});

test('two tasks of one peer go out in the same write; another peer gets its own', async () => {
  const a = newTask('a');
  const b = newTask('b');
  const p = peer();
  const q = peer();
  a.subscribe(p.sink, 0).pump();
  b.subscribe(p.sink, 0).pump();
  b.subscribe(q.sink, 0).pump();
  a.pushDelta('x');
  b.pushDelta('y');
  await nextTurn();
  assert.equal(p.writes.length, 1);
  assert.deepEqual(deltaTexts(p.frames()).sort(), ['x', 'y']);
  assert.deepEqual(deltaTexts(q.frames()), ['y']);
});

test('while the only peer is backed up the chunks pile into one delta, with no gap in seq', async () => {
  const task = newTask();
  let backedUp = false;
  const p = peer({ congested: () => backedUp });
  const sub = task.subscribe(p.sink, 0);
  sub.pump();
  task.pushDelta('a');
  await nextTurn();
  backedUp = true;
  task.pushDelta('b');
  task.pushDelta('c');
  await nextTurn();
  task.pushDelta('d');
  await nextTurn();
  assert.deepEqual(deltaTexts(p.frames()), ['a']);
  backedUp = false;
  sub.pump();
  assert.deepEqual(deltaTexts(p.frames()), ['a', 'bcd']);
  assert.deepEqual(
    p.frames().map((m) => (m as { seq: number }).seq),
    [0, 1],
  );
});

test('with no subscriber the text piles into one delta that a later subscriber replays', async () => {
  const task = newTask();
  task.pushDelta('one');
  task.pushDelta(' two');
  await nextTurn();
  const p = peer();
  task.subscribe(p.sink, 0).pump();
  assert.deepEqual(deltaTexts(p.frames()), ['one two']);
});

test('end sends what is pending and the terminal message at once, in order, exactly once', async () => {
  const task = newTask();
  const p = peer();
  task.subscribe(p.sink, 0).pump();
  task.pushDelta('last');
  task.end(doneOf('t1'), 'done');
  assert.deepEqual(
    p.frames().map((m) => m.type),
    ['chat.delta', 'chat.done'],
  );
  await nextTurn();
  assert.equal(p.frames().length, 2, 'the turn flush sends nothing again');
  assert.equal(task.subscribers.size, 0);
});

test('an ended task replays from any seq exactly the deltas a live subscriber was sent', async () => {
  const task = newTask();
  task.pushDelta('piled ');
  task.pushDelta('up ');
  await nextTurn();
  const live = peer();
  task.subscribe(live.sink, 0).pump();
  for (const word of ['one', ' two', ' three', ' ünïcødé 🚀', ' end']) task.pushDelta(word);
  await nextTurn();
  task.pushDelta('!', false);
  task.end(doneOf('t1'), 'done');
  const sent = deltaTexts(live.frames());
  assert.deepEqual(sent, ['piled up ', 'one', ' two', ' three', ' ünïcødé 🚀', ' end', '!']);
  assert.equal(task.info().seq, sent.length);
  assert.equal(task.info().text, sent.join(''));
  for (let from = 0; from <= sent.length; from++) {
    const later = peer();
    task.subscribe(later.sink, from).pump();
    assert.deepEqual(deltaTexts(later.frames()), sent.slice(from), `resume from ${from}`);
    assert.equal(later.frames().at(-1)?.type, 'chat.done');
  }
});

test("a subscription is sent nothing, not its task's text and not its end, before its owner's first pump", async () => {
  const task = newTask();
  const p = peer();
  // The owner subscribes, then replies to its client (chat.resume's ok) before it pumps.
  const sub = task.subscribe(p.sink, 0);
  task.pushDelta('early');
  await nextTurn();
  task.end(doneOf('t1'), 'done');
  assert.deepEqual(p.frames(), []);
  sub.pump();
  assert.deepEqual(
    p.frames().map((m) => m.type),
    ['chat.delta', 'chat.done'],
  );
  assert.equal(sub.closed, true);
});
