import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { readGgufHeader } from '../../src/llm/gguf-reader.js';
import { writeTinyLlamaGguf, type TinyLlamaInfo } from '../fixtures/gguf-tiny-llama.js';
import { createLocalProvider, validateLocalModel } from '../../src/llm/local.js';
import { createModelPool, type ModelPool } from '../../src/llm/pool.js';
import { providerSettingsFrom, type ModelRequest, type ModelResult, type Provider } from '../../src/llm/provider.js';
import { AppError } from '../../src/protocol/index.js';

const request: ModelRequest = {
  model: 'tiny',
  messages: [
    { role: 'system', content: 'You help people book home services.' },
    { role: 'user', content: 'Can someone fix my fence tomorrow?' },
  ],
  temperature: 0,
  maxTokens: 12,
};

interface Outcome {
  chunks: string[];
  result?: ModelResult;
  error?: unknown;
}

async function collect(provider: Provider, req: ModelRequest, signal = new AbortController().signal, onChunk?: (count: number) => void): Promise<Outcome> {
  const chunks: string[] = [];
  try {
    const it = provider.stream(req, signal);
    for (;;) {
      const step = await it.next();
      if (step.done) return { chunks, result: step.value };
      chunks.push(step.value);
      onChunk?.(chunks.length);
    }
  } catch (error) {
    return { chunks, error };
  }
}

/** The generated model only ever emits whole words of its vocabulary and punctuation. */
function assertVocabularyText(text: string, model: TinyLlamaInfo): void {
  const allowed = new Set([...model.words, '.', ',', '?', '!']);
  const words = text.split(/(?=[.,?!])|\s+/).filter((w) => w.length > 0);
  assert.ok(words.length > 0, 'no words');
  for (const w of words) assert.ok(allowed.has(w), `unexpected word ${JSON.stringify(w)} in ${JSON.stringify(text)}`);
}

describe('GGUF fixture and model validation', () => {
  let dir: string;
  let model: TinyLlamaInfo;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-gguf-'));
    model = writeTinyLlamaGguf(path.join(dir, 'tiny.gguf'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('the generated model is a valid GGUF llama model', async () => {
    assert.equal(fs.statSync(model.path).size, model.bytes);
    const info = await validateLocalModel(model.path);
    const { identity, ...rest } = info;
    assert.deepEqual(rest, {
      path: model.path,
      architecture: 'llama',
      name: 'chatwire tiny llama (random weights, seed 1)',
      fileBytes: model.bytes,
      trainContextSize: 4096,
    });
    assert.match(identity, new RegExp(`^gguf-[0-9a-f]{64}-${model.bytes}-\\d+$`));
  });

  test('the model identity follows the file: another model or a rewrite changes it, a move does not', async () => {
    const at = new Date('2026-01-02T03:04:05Z');
    const a = writeTinyLlamaGguf(path.join(dir, 'id-a.gguf'));
    const b = writeTinyLlamaGguf(path.join(dir, 'id-b.gguf'), { seed: 2 });
    for (const file of [a.path, b.path]) fs.utimesSync(file, at, at);
    const first = (await validateLocalModel(a.path)).identity;
    assert.equal((await validateLocalModel(a.path)).identity, first);
    // Another model, same size and time: its header differs (the generated ones name their seed).
    assert.equal(b.bytes, a.bytes);
    assert.notEqual((await validateLocalModel(b.path)).identity, first);
    // Moved (rename keeps the time): the same identity.
    const moved = path.join(dir, 'id-moved.gguf');
    fs.renameSync(a.path, moved);
    assert.equal((await validateLocalModel(moved)).identity, first);
    // Rewritten in place with the same bytes but at another time: a new identity (a changed file is not trusted).
    fs.utimesSync(moved, at, new Date('2026-01-02T03:04:06Z'));
    assert.notEqual((await validateLocalModel(moved)).identity, first);
  });

  test('the GGUF header reads back as written', () => {
    const header = readGgufHeader(model.path);
    assert.equal(header.version, 3);
    assert.equal(header.metadata.get('general.architecture'), 'llama');
    assert.equal(header.metadata.get('llama.embedding_length'), 64);
    assert.equal(header.metadata.get('llama.block_count'), 2);
    assert.equal(header.metadata.get('tokenizer.ggml.model'), 'llama');
    assert.deepEqual(header.metadata.get('tokenizer.ggml.tokens'), { array: 'string', length: model.vocabSize });
    assert.equal(header.tensors.length, 3 + 2 * 9);
    assert.deepEqual(header.tensors[0], { name: 'token_embd.weight', dims: [64, model.vocabSize], type: 0, offset: 0 });
    assert.equal(header.dataOffset % 32, 0);
    // The data ends with the last tensor, padded to the alignment.
    assert.equal(Math.ceil((header.dataOffset + header.dataBytes) / 32) * 32, model.bytes);
    assert.equal(
      header.tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0),
      model.parameters,
    );
  });

  test('the same options write the same bytes', () => {
    const again = writeTinyLlamaGguf(path.join(dir, 'again.gguf'));
    assert.deepEqual(fs.readFileSync(again.path), fs.readFileSync(model.path));
  });

  test('an unset, missing, non-file, non-GGUF or truncated model is refused with a message naming it', async () => {
    await assert.rejects(validateLocalModel(undefined), { message: 'CHATWIRE_MODEL_PATH is not set: the local provider needs the path of a GGUF model file' });
    const missing = path.join(dir, 'missing.gguf');
    await assert.rejects(validateLocalModel(missing), { message: `model file ${missing} does not exist` });
    await assert.rejects(validateLocalModel(dir), { message: `model file ${dir} is not a file` });
    const text = path.join(dir, 'notes.gguf');
    fs.writeFileSync(text, 'this is not a model\n'.repeat(100));
    await assert.rejects(validateLocalModel(text), { message: `model file ${text} is not a valid GGUF file (it does not start with the GGUF magic)` });
    const fakeMagic = path.join(dir, 'fake-magic.gguf');
    fs.writeFileSync(fakeMagic, 'GGUF but not really');
    await assert.rejects(validateLocalModel(fakeMagic), {
      message: `model file ${fakeMagic} is not a valid GGUF file (unsupported GGUF version ${Buffer.from(' but').readUInt32LE(0)})`,
    });
    const header = readGgufHeader(model.path);
    const cutHeader = path.join(dir, 'cut-header.gguf');
    fs.writeFileSync(cutHeader, fs.readFileSync(model.path).subarray(0, 1000));
    await assert.rejects(validateLocalModel(cutHeader), {
      message: `model file ${cutHeader} is not a valid GGUF file (length of tokenizer.ggml.tokens (${model.vocabSize}) does not fit in the file)`,
    });
    const truncated = path.join(dir, 'truncated.gguf');
    const half = Math.floor(model.bytes / 2);
    fs.writeFileSync(truncated, fs.readFileSync(model.path).subarray(0, half));
    await assert.rejects(validateLocalModel(truncated), {
      message: `model file ${truncated} is truncated (${half} bytes, its tensors need ${header.dataOffset + header.dataBytes})`,
    });
  });
});

describe('local provider on a generated GGUF model', () => {
  let dir: string;
  let model: TinyLlamaInfo;
  let provider: Provider;
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-local-'));
    model = writeTinyLlamaGguf(path.join(dir, 'tiny.gguf'));
    provider = await createLocalProvider({ modelPath: model.path, threads: 1, contextSize: 512, sequences: 2 });
  });
  after(async () => {
    await provider.close?.();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('tokens stream and stop at maxTokens with finishReason length and counted usage', async () => {
    const out = await collect(provider, request);
    assert.equal(out.error, undefined);
    assert.ok(out.chunks.length >= 2, `only ${out.chunks.length} chunks`);
    assertVocabularyText(out.chunks.join(''), model);
    assert.equal(out.result?.finishReason, 'length');
    assert.equal(out.result?.usage.completionTokens, 12);
    assert.equal(out.result?.usageSource, 'counted');
    assert.ok((out.result?.usage.promptTokens ?? 0) > 0);
  });

  test('the prompt tokens are counted with the model tokenizer: a longer conversation counts more', async () => {
    const short = await collect(provider, { ...request, maxTokens: 1 });
    const longer = await collect(provider, {
      ...request,
      maxTokens: 1,
      messages: [...request.messages, { role: 'assistant', content: 'Yes, a team can visit.' }, { role: 'user', content: 'Great, book it.' }],
    });
    assert.ok((longer.result?.usage.promptTokens ?? 0) > (short.result?.usage.promptTokens ?? 0));
    assert.equal(short.result?.usage.completionTokens, 1);
  });

  test('temperature 0 gives the same reply to the same request', async () => {
    const a = await collect(provider, request);
    const b = await collect(provider, request);
    assert.equal(a.chunks.join(''), b.chunks.join(''));
  });

  test('without maxTokens the reply ends when the context is full', async () => {
    const out = await collect(provider, { ...request, maxTokens: undefined });
    assert.equal(out.result?.finishReason, 'length');
    assert.equal((out.result?.usage.promptTokens ?? 0) + (out.result?.usage.completionTokens ?? 0), 512);
  });

  test('cancel stops the generation and returns the usage so far; the sequence is reused', async () => {
    const controller = new AbortController();
    const out = await collect(provider, { ...request, maxTokens: 400 }, controller.signal, (n) => {
      if (n === 3) controller.abort();
    });
    assert.equal(out.error, undefined);
    assert.equal(out.result?.finishReason, 'stop');
    const completion = out.result?.usage.completionTokens ?? 0;
    assert.ok(completion >= 3 && completion < 400, `completionTokens ${completion}`);
    const next = await collect(provider, request);
    assert.equal(next.result?.usage.completionTokens, 12);
  });

  test('more generations than sequences wait their turn and all finish', async () => {
    const outs = await Promise.all(Array.from({ length: 5 }, (_, i) => collect(provider, { ...request, maxTokens: 6 + i })));
    outs.forEach((out, i) => {
      assert.equal(out.error, undefined);
      assert.equal(out.result?.usage.completionTokens, 6 + i);
    });
  });

  test('a consumer that stops reading early gives its sequence back', async () => {
    for (let round = 0; round < 3; round++) {
      const it = provider.stream({ ...request, maxTokens: 300 }, new AbortController().signal);
      await it.next();
      await it.return(undefined as never);
    }
    const out = await collect(provider, request);
    assert.equal(out.result?.usage.completionTokens, 12);
  });

  test('check() resolves while the model is loaded', async () => {
    await provider.check?.();
  });

  test('a closed provider refuses to stream', async () => {
    const other = await createLocalProvider({ modelPath: model.path, threads: 1, contextSize: 256, sequences: 1 });
    await other.close?.();
    const out = await collect(other, request);
    assert.ok(out.error instanceof AppError);
    assert.equal(out.error.code, 'upstream_error');
    assert.equal(out.error.message, 'the local model is closed');
    await assert.rejects(other.check?.() ?? Promise.resolve(), { message: 'the local model is closed' });
  });

  test('close() during a generation ends it with upstream_error after the tokens so far', async () => {
    const other = await createLocalProvider({ modelPath: model.path, threads: 1, contextSize: 512, sequences: 1 });
    let closing: Promise<void> | undefined;
    const out = await collect(other, { ...request, maxTokens: 400 }, new AbortController().signal, (n) => {
      if (n === 2) closing = other.close?.();
    });
    await closing;
    assert.ok(out.chunks.length >= 2);
    assert.ok(out.error instanceof AppError);
    assert.equal(out.error.code, 'upstream_error');
    assert.equal(out.error.message, 'the local model was closed during the generation');
  });

  test('creating the provider on a missing model fails with the reason', async () => {
    const missing = path.join(dir, 'nope.gguf');
    await assert.rejects(createLocalProvider({ modelPath: missing, threads: 1, contextSize: 256 }), { message: `model file ${missing} does not exist` });
  });
});

describe('local provider through the worker pool', () => {
  let dir: string;
  let model: TinyLlamaInfo;
  let pool: ModelPool;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-local-pool-'));
    model = writeTinyLlamaGguf(path.join(dir, 'tiny.gguf'));
    const config = loadConfig({}, { llm: 'local', modelPath: model.path, localThreads: 1, localContextSize: 512 });
    pool = createModelPool({ settings: providerSettingsFrom(config), threads: 1, tasksPerWorker: 8, maxQueue: 16, taskTimeoutMs: 60_000 });
  });
  after(async () => {
    await pool.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function run(req: ModelRequest, cancelAfter?: number): Promise<{ chunks: string[]; result?: ModelResult | null; cancelled?: boolean; error?: AppError }> {
    return new Promise((resolve) => {
      const slot = pool.reserve('test');
      assert.ok(slot);
      const chunks: string[] = [];
      const handle = slot.run(req, {
        onChunk(text) {
          chunks.push(text);
          if (chunks.length === cancelAfter) handle.cancel();
        },
        onEnd: (result, cancelled) => resolve({ chunks, result, cancelled }),
        onError: (error) => resolve({ chunks, error }),
      });
    });
  }

  test('the worker loads the model: pool.check() resolves', async () => {
    await pool.check(60_000);
  });

  test('chunks and the end with its usage cross the worker boundary', async () => {
    const out = await run(request);
    assert.equal(out.error, undefined);
    assert.equal(out.cancelled, false);
    assertVocabularyText(out.chunks.join(''), model);
    assert.equal(out.result?.finishReason, 'length');
    assert.equal(out.result?.usage.completionTokens, 12);
  });

  test('cancel through the pool ends the run as cancelled', async () => {
    const out = await run({ ...request, maxTokens: 2000 }, 1);
    assert.equal(out.cancelled, true);
    assert.ok((out.result?.usage.completionTokens ?? 0) < 2000);
  });

  test('closing a pool while its workers generate frees the models without bringing the process down', async () => {
    const config = loadConfig({}, { llm: 'local', modelPath: model.path, localThreads: 1, localContextSize: 512 });
    const busy = createModelPool({ settings: providerSettingsFrom(config), threads: 2, tasksPerWorker: 2, maxQueue: 4, taskTimeoutMs: 60_000 });
    const outcomes: Array<Promise<{ chunks: number; code?: string; message?: string }>> = [];
    let started = 0;
    let allStarted: () => void = () => {};
    const streaming = new Promise<void>((resolve) => {
      allStarted = resolve;
    });
    for (let i = 0; i < 4; i++) {
      const slot = busy.reserve('test');
      assert.ok(slot);
      let chunks = 0;
      outcomes.push(
        new Promise((resolve) => {
          slot.run(
            { ...request, maxTokens: 100_000 },
            {
              onChunk() {
                if (++chunks === 1 && ++started === 4) allStarted();
              },
              onEnd: () => resolve({ chunks }),
              onError: (e) => resolve({ chunks, code: e.code, message: e.message }),
            },
          );
        }),
      );
    }
    await streaming;
    await busy.close();
    for (const out of await Promise.all(outcomes)) {
      assert.ok(out.chunks >= 1);
      assert.equal(out.code, 'upstream_error');
      assert.equal(out.message, 'the local model was closed during the generation');
    }
  });

  test('a worker whose model file is bad fails pool.check() with the reason', async () => {
    const bad = path.join(dir, 'bad.gguf');
    fs.writeFileSync(bad, 'GGUF but not really');
    const config = loadConfig({}, { llm: 'local', modelPath: bad, localThreads: 1, localContextSize: 512 });
    const badPool = createModelPool({ settings: providerSettingsFrom(config), threads: 1, tasksPerWorker: 1, maxQueue: 1, taskTimeoutMs: 10_000 });
    try {
      await assert.rejects(badPool.check(30_000), (err: Error) => err.message.startsWith(`model file ${bad} is not a valid GGUF file (`));
    } finally {
      await badPool.close();
    }
  });
});
