/**
 * The chat.send check that runs without zod (plainChatSend) must agree with ChatSendSchema: whatever it accepts,
 * the schema accepts, and it gives the same message (the same keys in the same order); whatever else it meets is
 * left to the schema (null), so refusals are the schema's.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ChatSendSchema } from '../../src/protocol/messages.js';
import { plainChatSend, validateClientMessage } from '../../src/protocol/parse.js';

const EMOJI = '\u{1F600}';

/** Values for each field: valid ones at and around the bounds, and invalid ones of every kind. */
const FIELD_VALUES: Record<string, unknown[]> = {
  id: ['c1', 'x'.repeat(64), 'x'.repeat(65), EMOJI.repeat(32), EMOJI.repeat(33), '', 7, null],
  text: ['hello', 'x'.repeat(16000), 'x'.repeat(16001), EMOJI.repeat(8000), EMOJI.repeat(8001), EMOJI, '', 1, null, ['a']],
  conversationId: ['conv_1', 'x'.repeat(128), 'x'.repeat(129), EMOJI.repeat(100), '', null, {}],
  model: ['fake-1', 'x'.repeat(128), 'x'.repeat(129), '', false],
  cache: ['use', 'bypass', 'refresh', 'USE', '', 0, null],
  clientMessageId: ['m-1.a:b_c', 'x'.repeat(64), 'x'.repeat(65), 'has space', 'é', EMOJI, '', 3],
  params: [
    {},
    { temperature: 0 },
    { temperature: 2 },
    { temperature: 2.0001 },
    { temperature: -0 },
    { temperature: -1 },
    { temperature: Number.NaN },
    { temperature: Number.POSITIVE_INFINITY },
    { temperature: '1' },
    { maxTokens: 1 },
    { maxTokens: 4096 },
    { maxTokens: 4097 },
    { maxTokens: 0 },
    { maxTokens: 1.5 },
    { maxTokens: '10' },
    { system: '' },
    { system: 'x'.repeat(8000) },
    { system: 'x'.repeat(8001) },
    { system: EMOJI.repeat(4001) },
    { system: 3 },
    { temperature: 1, maxTokens: 10, system: 'be brief' },
    { system: 'be brief', maxTokens: 10, temperature: 1 },
    { extra: 1 },
    { temperature: undefined },
    null,
    [],
    'params',
  ],
};

function agree(value: Record<string, unknown>): void {
  const plain = plainChatSend(value);
  const schema = ChatSendSchema.safeParse(value);
  const where = JSON.stringify(value).slice(0, 200);
  if (plain === null) return;
  assert.ok(schema.success, `accepted without zod, refused by the schema: ${where}`);
  assert.deepEqual(plain, schema.data, where);
  // The same keys in the same order, as a transport that serializes the message would see them.
  assert.equal(JSON.stringify(plain), JSON.stringify(schema.data), where);
  assert.notEqual(plain, value, 'a copy, as the schema gives');
}

test('every chat.send the check accepts without zod is one the schema accepts, read the same', () => {
  let accepted = 0;
  for (const [field, values] of Object.entries(FIELD_VALUES)) {
    for (const v of values) {
      for (const base of [
        { type: 'chat.send', text: 'hi' },
        { cache: 'bypass', text: 'hi', type: 'chat.send', id: 'r1' },
      ]) {
        const value: Record<string, unknown> = { ...base, [field]: v };
        agree(value);
        if (plainChatSend(value) !== null) accepted++;
      }
    }
  }
  // The common frames do take the path without zod.
  assert.ok(accepted > 40, `accepted without zod: ${accepted}`);
  assert.notEqual(plainChatSend({ type: 'chat.send', id: 'c1', text: 'hi', params: { maxTokens: 50 }, cache: 'bypass' }), null);
});

test('what the check is not sure of is left to the schema', () => {
  const cases: Record<string, unknown>[] = [
    { type: 'chat.send' },
    { type: 'chat.send', text: 'hi', unknown: 1 },
    { type: 'chat.send', text: 'hi', id: undefined },
    { type: 'chat.cancel', text: 'hi' },
    JSON.parse('{"type":"chat.send","text":"hi","__proto__":{"x":1}}') as Record<string, unknown>,
    Object.assign(Object.create({ inherited: true }) as Record<string, unknown>, { type: 'chat.send', text: 'hi' }),
  ];
  for (const value of cases) {
    assert.equal(plainChatSend(value), null, JSON.stringify(value));
    agree(value);
  }
  // The refusals are the schema's own.
  const refused = validateClientMessage({ type: 'chat.send', text: '', id: 'r2' });
  assert.equal(refused.ok, false);
  if (!refused.ok) {
    assert.equal(refused.error.code, 'bad_request');
    assert.equal(refused.id, 'r2');
  }
  const ok = validateClientMessage({ type: 'chat.send', text: EMOJI.repeat(8001) });
  assert.equal(ok.ok, ChatSendSchema.safeParse({ type: 'chat.send', text: EMOJI.repeat(8001) }).success);
});
