import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  badRequestFromZod,
  ChatSendSchema,
  CLIENT_MESSAGE_BOUNDS,
  ClientMessageSchema,
  PingSchema,
  scanFrame,
  validateClientMessage,
} from '../../src/protocol/index.js';

const nested = (levels: number) => '['.repeat(levels) + ']'.repeat(levels);

test('the bounds are those of the largest client message: chat.send with params, 2 levels and 11 values', () => {
  assert.deepEqual(CLIENT_MESSAGE_BOUNDS, { depth: 2, values: 11 });
  const largest = {
    type: 'chat.send',
    id: 'a',
    text: 'hi',
    conversationId: 'c',
    model: 'm',
    params: { temperature: 0, maxTokens: 5, system: 's' },
    cache: 'use',
    clientMessageId: 'k',
  };
  assert.equal(ClientMessageSchema.safeParse(largest).success, true);
  assert.deepEqual(scanFrame(JSON.stringify(largest), CLIENT_MESSAGE_BOUNDS), { ok: true, id: 'a' });
});

test('a 64 KiB frame of 32,000 nested arrays, a flat array of 32,000 values and 6,400 keys are refused undecoded, with the id', () => {
  const deep = scanFrame(nested(32_000), CLIENT_MESSAGE_BOUNDS);
  assert.equal(deep.ok, false);
  assert.match(deep.ok ? '' : deep.reason, /nests deeper than any message \(at most 2 levels\)/);
  const flat = scanFrame(`[${Array.from({ length: 32_000 }, () => '0').join(',')}]`, CLIENT_MESSAGE_BOUNDS);
  assert.equal(flat.ok, false);
  assert.match(flat.ok ? '' : flat.reason, /more values than any message \(at most 11\)/);
  const keys: Record<string, number> = {};
  for (let i = 0; i < 6400; i++) keys[`k${i}`] = i;
  const many = scanFrame(JSON.stringify({ id: 'x1', type: 'ping', ...keys }), CLIENT_MESSAGE_BOUNDS);
  assert.deepEqual(many, { ok: false, id: 'x1', reason: 'frame holds more values than any message (at most 11)' });
  const viaParse = scanFrame(`{"id":"deep","type":"ping","a":${nested(100)}}`, CLIENT_MESSAGE_BOUNDS);
  assert.equal(viaParse.ok, false);
  assert.equal(viaParse.ok ? '' : viaParse.id, 'deep');
});

test('brackets, braces, commas, colons and escaped quotes inside strings are not structure', () => {
  const text = JSON.stringify({ type: 'chat.send', id: 'q"\\', text: '[[[[{{{{,,,,::::"\\"]]]]'.repeat(200) });
  assert.deepEqual(scanFrame(text, CLIENT_MESSAGE_BOUNDS), { ok: true, id: 'q"\\' });
  // An id the schema would not accept (too long, not a string) is not echoed; a nested "id" is not the message's.
  assert.equal(scanFrame(JSON.stringify({ id: 'x'.repeat(65), type: 'ping' }), CLIENT_MESSAGE_BOUNDS).id, undefined);
  assert.equal(scanFrame(JSON.stringify({ id: 7, type: 'ping' }), CLIENT_MESSAGE_BOUNDS).id, undefined);
  assert.equal(scanFrame(JSON.stringify({ type: 'chat.send', params: { id: 'inner' } }), CLIENT_MESSAGE_BOUNDS).id, undefined);
  // In a socket.io event the message is the second element of the array.
  assert.equal(scanFrame(JSON.stringify(['ping', { id: 'sio' }]), { depth: 3, values: 12 }, 2).id, 'sio');
});

test('every frame that passes the schema passes the scan (any message, any spacing)', () => {
  const text = fc.string({ maxLength: 40 });
  const id = fc.option(fc.string({ minLength: 1, maxLength: 64 }), { nil: undefined });
  const message = fc.oneof(
    fc.record({ type: fc.constant('ping'), id }, { requiredKeys: ['type'] }),
    fc.record(
      {
        type: fc.constant('chat.send'),
        id,
        text: fc.string({ minLength: 1, maxLength: 40 }),
        conversationId: fc.string({ minLength: 1, maxLength: 20 }),
        model: fc.string({ minLength: 1, maxLength: 20 }),
        params: fc.record(
          { temperature: fc.double({ min: 0, max: 2, noNaN: true }), maxTokens: fc.integer({ min: 1, max: 4096 }), system: text },
          { requiredKeys: [] },
        ),
        cache: fc.constantFrom('use', 'bypass', 'refresh'),
      },
      { requiredKeys: ['type', 'text'] },
    ),
    fc.record(
      { type: fc.constant('chat.resume'), id, taskId: fc.string({ minLength: 1, maxLength: 20 }), fromSeq: fc.nat() },
      { requiredKeys: ['type', 'taskId', 'fromSeq'] },
    ),
  );
  fc.assert(
    fc.property(message, fc.constantFrom(undefined, 1, '\t'), (m, space) => {
      const frame = JSON.stringify(m, null, space);
      assert.equal(validateClientMessage(JSON.parse(frame)).ok, true);
      const shape = scanFrame(frame, CLIENT_MESSAGE_BOUNDS);
      assert.deepEqual(shape, { ok: true, id: (m as { id?: string }).id });
    }),
  );
});

test('a refusal stays small: 6,400 unknown keys are named by the first five and a count, and details are capped', () => {
  const keys: Record<string, number> = { type: 0 };
  for (let i = 0; i < 6400; i++) keys[`key-${'k'.repeat(i % 50)}-${i}`] = i;
  const result = PingSchema.safeParse({ ...keys, type: 'ping' });
  assert.equal(result.success, false);
  const err = badRequestFromZod(result.error!, 'ping');
  const size = JSON.stringify({ message: err.message, details: err.details }).length;
  assert.ok(size < 1024, `error of ${size} bytes`);
  assert.match(err.details![0]!.message, /^Unrecognized keys: "key--0", "key-k-1", .* and 6395 more$/);
  // Many failing paths: ten listed, then how many more.
  const many = ChatSendSchema.safeParse({
    type: 'chat.send',
    id: 5,
    text: 5,
    conversationId: 5,
    model: 5,
    cache: 5,
    params: { temperature: 'a', maxTokens: 'b', system: 5 },
    extra: 1,
  });
  const details = badRequestFromZod(many.error!).details!;
  assert.ok(details.length <= 11, `${details.length} details`);
  for (const d of details) assert.ok(d.message.length <= 250 && d.path.length <= 250);
});
