/**
 * Random and malformed bodies for POST /v1/chat/completions: every one gets a documented answer in the OpenAI
 * error shape, never a 500. The seed is printed with any failure; replay one with FUZZ_SEED=<seed>.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { startServer, type TestServer } from '../helpers/server.js';

const SEED = process.env.FUZZ_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.FUZZ_SEED);
const MAX_FRAME_BYTES = 8192;
const STACK_TRACE = /\n\s+at |\(file:|\.js:\d+:\d+|node:internal/;
// 401: a `user` field that is no valid user id, as `?user=` would be (open mode).
const TYPE_OF_STATUS: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  404: 'invalid_request_error',
  413: 'invalid_request_error',
};

function run<T>(name: string, arb: fc.Arbitrary<T>, numRuns: number, check: (value: T) => Promise<void>): Promise<void> {
  return fc.assert(fc.asyncProperty(arb, check), { numRuns, seed: SEED, endOnFailure: true }).catch((err: unknown) => {
    throw new Error(`${name} failed with FUZZ_SEED=${SEED}: ${err instanceof Error ? err.message : String(err)}`);
  });
}

interface Answer {
  status: number;
  text: string;
  error: { message: unknown; type: unknown; param: unknown; code: unknown } | undefined;
}

async function post(server: TestServer, body: string, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(`${server.http}/v1/chat/completions?user=fuzzer`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body,
  });
  const text = await res.text();
  let error: Answer['error'];
  if (res.status !== 200) error = (JSON.parse(text) as { error: Answer['error'] }).error;
  return { status: res.status, text, error };
}

/** A refusal in the OpenAI error shape: exactly message, type, param and code, the type of its status. */
function assertErrorShape(answer: Answer, what: string): void {
  assert.doesNotMatch(answer.text, STACK_TRACE, what);
  assert.ok(answer.error !== undefined, what);
  assert.deepEqual(Object.keys(answer.error).sort(), ['code', 'message', 'param', 'type'], what);
  assert.equal(typeof answer.error.message, 'string', what);
  assert.equal(answer.error.type, TYPE_OF_STATUS[answer.status], what);
  assert.ok(answer.error.param === null || typeof answer.error.param === 'string', what);
}

// ---------- arbitraries ----------

const opt = <T>(arb: fc.Arbitrary<T>) => fc.option(arb, { nil: undefined, freq: 2 });
const compact = (m: Record<string, unknown>) => Object.fromEntries(Object.entries(m).filter(([, v]) => v !== undefined));
const text = fc.oneof(fc.string({ maxLength: 30 }), fc.string({ unit: 'grapheme', maxLength: 30 }), fc.constantFrom('', ' ', '\u0000', '__proto__'));
const anyJson = fc.jsonValue({ maxDepth: 3 });
/** Mostly a value of the field's own kind, sometimes anything. */
const mostly = <T>(good: fc.Arbitrary<T>) => fc.oneof({ weight: 20, arbitrary: good }, { weight: 1, arbitrary: anyJson });
/** Half the time left out; when present, mostly a value of the field's own kind. */
const field = <T>(good: fc.Arbitrary<T>) => fc.option(mostly(good), { nil: undefined, freq: 2 });
/** Mostly left out. */
const rare = <T>(arb: fc.Arbitrary<T>) => fc.oneof({ weight: 8, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: arb });
const role = mostly(fc.constantFrom('system', 'developer', 'user', 'assistant'));
const part = fc.oneof(
  { weight: 8, arbitrary: fc.record({ type: fc.constant('text'), text }) },
  { weight: 1, arbitrary: fc.record({ type: fc.oneof(fc.constantFrom('image_url', 'input_audio', 'file', 'refusal'), text), text: opt(text) }).map(compact) },
  { weight: 1, arbitrary: anyJson },
);
const content = fc.oneof(
  { weight: 6, arbitrary: fc.string({ minLength: 1, maxLength: 30 }) },
  { weight: 2, arbitrary: fc.array(part, { maxLength: 3 }) },
  { weight: 1, arbitrary: anyJson },
);
const message = mostly(fc.record({ role, content, name: opt(text) }).map(compact));
const lastMessage = mostly(fc.record({ role: mostly(fc.constant('user')), content }));
const user = fc.oneof({ weight: 4, arbitrary: fc.stringMatching(/^[A-Za-z0-9._@-]{1,20}$/) }, { weight: 1, arbitrary: text });

/** Bodies shaped like completion requests, any field possibly wrong. */
const bodyLike = fc
  .record({
    model: mostly(fc.oneof({ weight: 8, arbitrary: fc.constant('dev-1') }, { weight: 1, arbitrary: text })),
    messages: mostly(fc.tuple(fc.array(message, { maxLength: 3 }), lastMessage).map(([earlier, last]) => [...earlier, last])),
    stream: field(fc.boolean()),
    stream_options: rare(fc.record({ include_usage: mostly(fc.boolean()) })),
    max_tokens: field(fc.integer({ min: 0, max: 4200 })),
    max_completion_tokens: rare(fc.integer({ min: 0, max: 4200 })),
    temperature: field(fc.double({ min: -0.1, max: 2.2, noNaN: true })),
    user: rare(user),
    n: field(fc.oneof({ weight: 4, arbitrary: fc.constantFrom(1, null) }, { weight: 1, arbitrary: fc.integer({ min: -1, max: 3 }) })),
    tools: rare(anyJson),
    tool_choice: rare(anyJson),
    functions: rare(anyJson),
    audio: rare(anyJson),
    response_format: rare(mostly(fc.record({ type: fc.oneof(fc.constantFrom('text', 'json_object', 'json_schema'), text) }))),
    seed: opt(anyJson),
    metadata: opt(anyJson),
  })
  .map(compact);

const rawBody = fc.oneof(
  { weight: 16, arbitrary: bodyLike.map((b) => JSON.stringify(b)) },
  { weight: 1, arbitrary: anyJson.map((v) => JSON.stringify(v)) },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 200 }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 100 }).map((n) => `{"model":"dev-1","messages":${'['.repeat(n)}${']'.repeat(n)}}`) },
  {
    weight: 1,
    arbitrary: fc
      .integer({ min: MAX_FRAME_BYTES - 50, max: MAX_FRAME_BYTES * 2 })
      .map((n) => JSON.stringify({ model: 'dev-1', messages: [{ role: 'user', content: 'z'.repeat(n) }] })),
  },
);

const headers = fc
  .record({ 'x-chatwire-cache': rare(fc.oneof(fc.constantFrom('use', 'bypass', 'refresh'), fc.stringMatching(/^[\x21-\x7e]{1,20}$/))) })
  .map((h) => compact(h) as Record<string, string>);

const VALID = {
  model: 'dev-1',
  messages: [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'Who repairs fences?' },
  ],
  max_tokens: 4,
};

/** One field of a valid body made wrong, and the `param` the 400 must name. */
const spoiled: fc.Arbitrary<{ body: Record<string, unknown>; param: string }> = fc.oneof(
  fc
    .oneof(
      fc.integer().filter((n) => n !== 1),
      fc.string(),
      fc.boolean(),
    )
    .map((n) => ({ body: { ...VALID, n }, param: 'n' })),
  fc
    .tuple(
      fc.constantFrom('tools', 'tool_choice', 'functions', 'audio'),
      anyJson.filter((v) => v !== null),
    )
    .map(([field, value]) => ({ body: { ...VALID, [field]: value }, param: field })),
  fc
    .oneof(text, fc.integer(), fc.constant(null))
    .filter((t) => t !== 'text')
    .map((type) => ({ body: { ...VALID, response_format: { type } }, param: 'response_format.type' })),
  fc
    .oneof(fc.double({ min: 2.000001, max: 1e9, noNaN: true }), fc.double({ max: -0.000001, min: -1e9, noNaN: true }), fc.string(), fc.boolean())
    .map((temperature) => ({
      body: { ...VALID, temperature },
      param: 'temperature',
    })),
  fc
    .tuple(
      fc.constantFrom('max_tokens', 'max_completion_tokens'),
      fc.oneof(fc.integer({ min: 4097 }), fc.integer({ max: 0 }), fc.double({ min: 1.1, max: 4000, noInteger: true, noNaN: true }), fc.string()),
    )
    .map(([field, value]) => ({ body: { ...VALID, max_tokens: undefined, [field]: value }, param: field })),
  fc.oneof(fc.string(), fc.integer(), fc.constant({})).map((stream) => ({ body: { ...VALID, stream }, param: 'stream' })),
  fc.oneof(fc.integer(), fc.constant(''), fc.constant(null), fc.boolean()).map((model) => ({ body: { ...VALID, model }, param: 'model' })),
  fc
    .tuple(
      fc.nat({ max: 1 }),
      text.filter((r) => !['system', 'developer', 'user', 'assistant'].includes(r)),
    )
    .map(([i, r]) => ({ body: { ...VALID, messages: VALID.messages.map((m, k) => (k === i ? { ...m, role: r } : m)) }, param: `messages.${i}.role` })),
  fc
    .tuple(
      fc.nat({ max: 1 }),
      fc.nat({ max: 2 }),
      fc.oneof(
        fc.constantFrom('image_url', 'input_audio', 'file', 'refusal'),
        text.filter((t) => t !== 'text'),
      ),
    )
    .map(([i, j, type]) => {
      const parts: unknown[] = [
        { type: 'text', text: 'hello' },
        { type: 'text', text: 'there' },
      ];
      parts.splice(j, 0, { type, image_url: { url: 'x' } });
      return { body: { ...VALID, messages: VALID.messages.map((m, k) => (k === i ? { ...m, content: parts } : m)) }, param: `messages.${i}.content.${j}.type` };
    }),
);

describe('fuzzing POST /v1/chat/completions', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ maxFrameBytes: MAX_FRAME_BYTES, messagesPerSecond: 100_000, chatsPerMinute: 100_000, modelTokensPerMinute: 100_000_000 });
  });
  after(() => server.close());

  test('random bodies and headers get a completion or a 400/401/404/413 in the OpenAI error shape, never a 500', async (t) => {
    const counts = new Map<string, number>();
    await run('completion bodies', fc.tuple(rawBody, headers), 400, async ([body, h]) => {
      const answer = await post(server, body, h);
      const what = `${answer.status} for ${body.slice(0, 300)} ${JSON.stringify(h)}: ${answer.text.slice(0, 300)}`;
      counts.set(String(answer.status), (counts.get(String(answer.status)) ?? 0) + 1);
      if (answer.status === 200) {
        assert.ok(answer.text.includes('"object":"chat.completion'), what);
        return;
      }
      assert.ok(answer.status in TYPE_OF_STATUS, what);
      assertErrorShape(answer, what);
      if (answer.status === 404) assert.equal(answer.error?.code, 'model_not_found', what);
      else assert.equal(answer.error?.code, { 400: 'bad_request', 401: 'unauthorized', 413: 'payload_too_large' }[answer.status], what);
    });
    t.diagnostic(`statuses: ${JSON.stringify(Object.fromEntries(counts))}`);
  });

  test('a valid body with one field made wrong is a 400 naming that field', async () => {
    assert.equal((await post(server, JSON.stringify(VALID))).status, 200);
    await run('spoiled bodies', spoiled, 300, async ({ body, param }) => {
      const answer = await post(server, JSON.stringify(body));
      const what = `${JSON.stringify(body).slice(0, 300)}: ${answer.text.slice(0, 300)}`;
      assert.equal(answer.status, 400, what);
      assertErrorShape(answer, what);
      assert.equal(answer.error?.code, 'bad_request', what);
      assert.equal(answer.error?.param, param, what);
    });
  });
});
