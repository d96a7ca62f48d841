import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { createChatwire, optionsFromEnv, OptionsError, settings } from '../../src/index.js';
import { configFromOptions } from '../../src/options.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

test('every setting is an option of the same name, with the same default', () => {
  const config = configFromOptions({});
  for (const name of Object.keys(settings) as (keyof typeof settings)[]) {
    assert.ok(name in config, name);
  }
  assert.equal(config.port, 8080);
  assert.equal(config.dataDir, './data');
  assert.equal(config.devTokenDelayMs, 15);
  assert.equal(config.allowedOrigins, '*');
});

test('options take typed values; the environment is not read', () => {
  const before = process.env.CHATWIRE_MAX_QUEUE;
  process.env.CHATWIRE_MAX_QUEUE = '7';
  try {
    const config = configFromOptions({
      port: 9000,
      devFaults: true,
      dataDir: '/tmp/x',
      allowedOrigins: ['https://App.example:443'],
      trustProxy: ['127.0.0.1'],
      messagesPerSecond: 0.5,
    });
    assert.equal(config.port, 9000);
    assert.equal(config.devFaults, true);
    assert.equal(config.dataPath, path.resolve('/tmp/x'));
    assert.deepEqual(config.allowedOrigins, ['https://app.example']);
    assert.deepEqual(config.trustProxy, ['127.0.0.1']);
    assert.equal(config.messagesPerSecond, 0.5);
    assert.equal(config.maxQueue, 1024);
  } finally {
    if (before === undefined) delete process.env.CHATWIRE_MAX_QUEUE;
    else process.env.CHATWIRE_MAX_QUEUE = before;
  }
});

test('a bad option throws one error naming the option, with the setting message', () => {
  assert.throws(
    () => createChatwire({ maxFrameBytes: 10 }),
    (err: unknown) => err instanceof OptionsError && err.message === 'invalid option maxFrameBytes: expected a whole number from 1024 to 16777216',
  );
  assert.throws(() => createChatwire({ port: 70_000 }), { message: 'invalid option port: expected a whole number from 0 to 65535' });
  assert.throws(() => createChatwire({ port: 80.5 }), { message: 'invalid option port: expected a whole number from 0 to 65535' });
  assert.throws(() => createChatwire({ llm: 'gpt' as 'dev' }), /^OptionsError|invalid option llm: /);
  assert.throws(() => createChatwire({ taskRetentionMs: 1000, port: -1 }), { message: /^invalid option taskRetentionMs: .*; invalid option port: / });
});

test('an option of the wrong type, or of no such name, is refused', () => {
  assert.throws(() => createChatwire({ devFaults: 1 as unknown as boolean }), { message: 'invalid option devFaults: expected true or false, got number' });
  assert.throws(() => createChatwire({ port: {} as unknown as number }), { message: 'invalid option port: expected a number, got object' });
  assert.throws(() => createChatwire({ dataPath: '/tmp' } as never), { message: 'unknown option dataPath' });
  assert.throws(() => createChatwire({ authenticate: 'yes' as never }), /invalid option authenticate: expected a function/);
  assert.throws(() => createChatwire({ logger: {} as never }), /invalid option logger: expected a pino-compatible logger/);
});

test('optionsFromEnv reads every setting from the environment, naming the variable when one is bad', () => {
  const options = optionsFromEnv({ PORT: '9001', CHATWIRE_DEV_TOKEN_DELAY_MS: '0', CHATWIRE_ALLOWED_ORIGINS: 'https://a.example' });
  assert.equal(options.port, 9001);
  assert.equal(options.devTokenDelayMs, 0);
  assert.deepEqual(options.allowedOrigins, ['https://a.example']);
  assert.equal(options.logLevel, 'info');
  assert.ok(!('dataPath' in options));
  // What the program does with them: the same config again.
  assert.equal(createChatwire(options).config.port, 9001);
  assert.throws(() => optionsFromEnv({ PORT: 'x' }), /PORT="x"/);
});

test("docs/embedding.md's options table has every setting, under its option name, with its variable and default", () => {
  const doc = fs.readFileSync(path.join(ROOT, 'docs', 'embedding.md'), 'utf8').split('\n');
  for (const [name, setting] of Object.entries(settings)) {
    const shown = setting.default === undefined ? '(unset)' : name === 'workerThreads' ? 'cores' : setting.default;
    const row = doc.find((line) => line.startsWith(`| \`${name}\` |`));
    assert.ok(row !== undefined, `docs/embedding.md has no row for ${name}`);
    assert.ok(row.endsWith(`| \`${setting.env}\` | \`${shown}\` |`), `docs/embedding.md: ${row}`);
  }
});
