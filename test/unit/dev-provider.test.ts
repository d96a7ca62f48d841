import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createDevProvider } from '../../src/llm/dev.js';
import type { ModelRequest, ModelResult } from '../../src/llm/provider.js';

async function run(request: ModelRequest, signal = new AbortController().signal, tokenDelayMs = 0): Promise<{ chunks: string[]; result: ModelResult }> {
  const provider = createDevProvider({ tokenDelayMs, faults: false });
  const it = provider.stream(request, signal);
  const chunks: string[] = [];
  for (;;) {
    const step = await it.next();
    if (step.done) return { chunks, result: step.value };
    chunks.push(step.value);
  }
}

const base: ModelRequest = { model: 'dev-1', messages: [{ role: 'user', content: 'Find me a plumber' }] };

test('the dev reply is a pure function of model, params and messages', async () => {
  const a = await run(base);
  const b = await run(base);
  assert.deepEqual(a, b);
  assert.equal(a.chunks.length, 32);
  assert.equal(a.result.finishReason, 'stop');
  assert.deepEqual(a.result.usage, { promptTokens: 4, completionTokens: 32 });
  assert.match(a.chunks.join(''), /^[A-Z][a-z]+( [a-z]+){31}$/);
  const otherModel = await run({ ...base, model: 'dev-2' });
  const otherTemp = await run({ ...base, temperature: 0.5 });
  const otherText = await run({ ...base, messages: [{ role: 'user', content: 'Find me a painter' }] });
  for (const other of [otherModel, otherTemp, otherText]) assert.notEqual(other.chunks.join(''), a.chunks.join(''));
});

test('maxTokens sets the number of tokens and ends with finishReason length', async () => {
  const { chunks, result } = await run({ ...base, maxTokens: 7 });
  assert.equal(chunks.length, 7);
  assert.equal(result.finishReason, 'length');
  assert.equal(result.usage.completionTokens, 7);
});

test('an abort stops generation and reports what was produced', async () => {
  const controller = new AbortController();
  const provider = createDevProvider({ tokenDelayMs: 5, faults: false });
  const it = provider.stream({ ...base, maxTokens: 1000 }, controller.signal);
  let produced = 0;
  for (;;) {
    const step = await it.next();
    if (step.done) {
      assert.equal(step.value.usage.completionTokens, produced);
      break;
    }
    if (++produced === 3) controller.abort();
  }
  assert.equal(produced, 3);
});

test('fault injection is off unless enabled', async () => {
  const { chunks } = await run({ ...base, messages: [{ role: 'user', content: '/fault exit' }] });
  assert.equal(chunks.length, 32);
});
