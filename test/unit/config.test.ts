import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { ConfigError, clusterMode, loadConfig, settings } from '../../src/config.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

test('the defaults work with an empty environment', () => {
  const config = loadConfig({});
  assert.equal(config.port, 8080);
  assert.equal(config.dataDir, './data');
  assert.equal(config.dataPath, path.resolve('./data'));
  assert.equal(config.llm, 'dev');
  assert.equal(config.devTokenDelayMs, 15);
  assert.equal(config.jwtSecret, undefined);
  assert.ok(Object.isFrozen(config));
});

test('values come from the environment, coerced and validated', () => {
  const config = loadConfig({
    PORT: '9000',
    CHATWIRE_DEV_TOKEN_DELAY_MS: '0',
    CHATWIRE_LLM: 'openai',
    CHATWIRE_DEV_FAULTS: 'true',
    CHATWIRE_JWT_SECRET: 's3cret',
  });
  assert.equal(config.port, 9000);
  assert.equal(config.devTokenDelayMs, 0);
  assert.equal(config.llm, 'openai');
  assert.equal(config.devFaults, true);
  assert.equal(config.jwtSecret, 's3cret');
});

test('a bad value stops the start with a message naming the variable', () => {
  for (const [env, name] of [
    [{ PORT: 'eighty' }, 'PORT'],
    [{ PORT: '70000' }, 'PORT'],
    [{ CHATWIRE_LLM: 'gpt' }, 'CHATWIRE_LLM'],
    [{ CHATWIRE_TASK_RETENTION_MS: '1000' }, 'CHATWIRE_TASK_RETENTION_MS'],
    [{ CHATWIRE_DEV_FAULTS: 'maybe' }, 'CHATWIRE_DEV_FAULTS'],
    [{ CHATWIRE_OPENAI_BASE_URL: 'not a url' }, 'CHATWIRE_OPENAI_BASE_URL'],
  ] as const) {
    assert.throws(
      () => loadConfig(env),
      (err: unknown) => err instanceof ConfigError && err.message.includes(`${name}=`),
      name,
    );
  }
});

test('every bad value is reported at once', () => {
  assert.throws(() => loadConfig({ PORT: 'x', CHATWIRE_MAX_QUEUE: '-1' }), /PORT=.*CHATWIRE_MAX_QUEUE=/);
});

/** Asserts that `env` stops the start with a ConfigError whose message is `NAME="value": <message>`. */
function assertRejected(env: Record<string, string>, message: RegExp | string): void {
  const [name, value] = Object.entries(env)[0]!;
  assert.throws(
    () => loadConfig(env),
    (err: unknown) => {
      assert.ok(err instanceof ConfigError, `${name}=${JSON.stringify(value)} should be a ConfigError`);
      const prefix = `${name}=${JSON.stringify(value)}: `;
      assert.ok(err.message.includes(prefix), `${err.message} should name ${prefix}`);
      const rest = err.message.slice(err.message.indexOf(prefix) + prefix.length);
      if (typeof message === 'string') assert.equal(rest, message);
      else assert.match(rest, message);
      return true;
    },
  );
}

test('CHATWIRE_JWT_SECRET set but empty or whitespace only stops the start instead of turning authentication off', () => {
  assertRejected({ CHATWIRE_JWT_SECRET: '' }, 'set but empty: give a value, or unset CHATWIRE_JWT_SECRET for open mode');
  assertRejected({ CHATWIRE_JWT_SECRET: ' ' }, 'set but only whitespace: give a value, or unset CHATWIRE_JWT_SECRET for open mode');
  assertRejected({ CHATWIRE_JWT_SECRET: '\t\n' }, /unset CHATWIRE_JWT_SECRET for open mode/);
  assert.throws(() => loadConfig({}, { jwtSecret: '' }), /CHATWIRE_JWT_SECRET="": set but empty/);
  // Only a variable that is not there at all means open mode; a short secret is kept (app.ts warns at start).
  assert.equal(loadConfig({ CHATWIRE_JWT_SECRET: undefined }).jwtSecret, undefined);
  assert.equal(loadConfig({ CHATWIRE_JWT_SECRET: 'x' }).jwtSecret, 'x');
});

test('CHATWIRE_OPENAI_API_KEY and CHATWIRE_MODEL_PATH read empty as unset, and whitespace only as a mistake', () => {
  assert.equal(loadConfig({ CHATWIRE_OPENAI_API_KEY: '' }).openaiApiKey, undefined);
  assert.equal(loadConfig({ CHATWIRE_OPENAI_API_KEY: 'sk-1' }).openaiApiKey, 'sk-1');
  assertRejected({ CHATWIRE_OPENAI_API_KEY: '  ' }, 'set but only whitespace: give a value, or leave CHATWIRE_OPENAI_API_KEY empty or unset for no key');
  assert.equal(loadConfig({ CHATWIRE_MODEL_PATH: '' }).modelPath, undefined);
  assert.equal(loadConfig({ CHATWIRE_MODEL_PATH: './m.gguf' }).modelPath, './m.gguf');
  assertRejected({ CHATWIRE_MODEL_PATH: ' ' }, 'set but only whitespace: give a value, or leave CHATWIRE_MODEL_PATH empty or unset for none');
});

test('integer settings take plain decimal integers only, then their range', () => {
  for (const value of ['', ' ', '0x1F90', '8e3', '80.0', '1.5', '+80', '-1', '80 80', 'Infinity', '1_000']) {
    assertRejected({ PORT: value }, 'expected a whole number from 0 to 65535');
  }
  assertRejected({ PORT: '65536' }, 'expected a whole number from 0 to 65535');
  assertRejected({ CHATWIRE_MAX_QUEUE: '' }, 'expected a whole number from 0 to 1000000');
  assertRejected({ CHATWIRE_CONTEXT_MESSAGES: '' }, 'expected a whole number from 0 to 1000');
  assertRejected({ CHATWIRE_LOCAL_THREADS: ' ' }, 'expected a whole number from 0 to 256');
  assertRejected({ CHATWIRE_TASK_RETENTION_MS: '1000' }, 'expected a whole number from 300000 to 86400000');
  assert.equal(loadConfig({ PORT: ' 9000 ' }).port, 9000);
  assert.equal(loadConfig({ PORT: '0' }).port, 0);
  assert.equal(loadConfig({ CHATWIRE_LOCAL_THREADS: '0' }).localThreads, 0);
  assert.equal(loadConfig({}, { port: 0, cacheMaxBytes: 1024 * 1024 * 1024 * 1024 }).cacheMaxBytes, 1024 ** 4);

  // Every numeric setting of the table: an empty value is never read as 0.
  const numeric = Object.values(settings).filter((s) => s.default !== undefined && /^\d+$/.test(s.default));
  assert.ok(numeric.length >= 25, `${numeric.length} numeric settings`);
  for (const setting of numeric) {
    for (const value of ['', ' ', '0x10', '1e3']) assertRejected({ [setting.env]: value }, /^expected a (whole )?number /);
  }
});

test('rate settings take positive decimals, and not an empty value', () => {
  assertRejected({ CHATWIRE_MESSAGES_PER_SECOND: '' }, 'expected a number above 0 and at most 1000000 (decimals like 0.5 allowed)');
  for (const value of [' ', '0', '-1', '1e3', '0x10', 'NaN', '1,5', '1000001'])
    assertRejected({ CHATWIRE_CHATS_PER_MINUTE: value }, /^expected a number above 0 and at most 1000000 /);
  assertRejected({ CHATWIRE_MODEL_TOKENS_PER_MINUTE: '' }, /^expected a number above 0 and at most 1000000000 /);
  const config = loadConfig({ CHATWIRE_MESSAGES_PER_SECOND: '0.5', CHATWIRE_CHATS_PER_MINUTE: ' 2.25 ', CHATWIRE_MODEL_TOKENS_PER_MINUTE: '1000000000' });
  assert.equal(config.messagesPerSecond, 0.5);
  assert.equal(config.chatsPerMinute, 2.25);
  assert.equal(config.modelTokensPerMinute, 1_000_000_000);
});

test('CHATWIRE_DATA_DIR, HOST and CHATWIRE_MODEL refuse a blank value', () => {
  assertRejected({ CHATWIRE_DATA_DIR: ' ' }, 'expected a directory path, not a blank value');
  assertRejected({ CHATWIRE_DATA_DIR: '' }, 'expected a directory path, not a blank value');
  assertRejected({ HOST: ' ' }, 'expected an address, not a blank value');
  assertRejected({ CHATWIRE_MODEL: '\t' }, 'expected a model name, not a blank value');
  assert.equal(loadConfig({ CHATWIRE_DATA_DIR: '/tmp/chatwire data' }).dataPath, '/tmp/chatwire data');
});

test('CHATWIRE_ALLOWED_ORIGINS is `*` or a list of origins, parsed once at start', () => {
  assert.equal(loadConfig({}).allowedOrigins, '*');
  assert.equal(loadConfig({ CHATWIRE_ALLOWED_ORIGINS: ' * ' }).allowedOrigins, '*');
  const list = loadConfig({ CHATWIRE_ALLOWED_ORIGINS: 'https://app.example, http://localhost:5173,https://App.Example:443,http://[::1]:8080' }).allowedOrigins;
  // Compared as browsers send Origin: lower case, the default port left out; duplicates merged.
  assert.deepEqual(list, ['https://app.example', 'http://localhost:5173', 'http://[::1]:8080']);
  assert.ok(Object.isFrozen(list));
  assert.deepEqual(loadConfig({}, { allowedOrigins: ['https://a.example', 'https://b.example'] }).allowedOrigins, ['https://a.example', 'https://b.example']);

  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: '' }, /^expected `\*` \(any origin\) or a comma-separated list of origins/);
  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: ' ' }, /^expected `\*` \(any origin\) or a comma-separated list of origins/);
  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: '*, https://a.example' }, '`*` allows any origin and cannot be combined with a list of origins');
  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: 'https://a.example,*' }, '`*` allows any origin and cannot be combined with a list of origins');
  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: 'https://a.example,' }, 'has an empty entry: remove the stray comma');
  for (const entry of [
    'app.example',
    'https://app.example/',
    'https://app.example/chat',
    'https://app.example?x=1',
    'https://user@app.example',
    'https://',
    '*.example.com',
    'https://app.example:port',
  ]) {
    assertRejected(
      { CHATWIRE_ALLOWED_ORIGINS: `https://ok.example, ${entry}` },
      `${JSON.stringify(entry)} is not an origin: expected scheme://host[:port] with no path, like https://app.example`,
    );
  }
  assertRejected({ CHATWIRE_ALLOWED_ORIGINS: 'https://app.example:70000' }, '"https://app.example:70000" has a port outside 1..65535');
});

test('CHATWIRE_OPENAI_BASE_URL takes http and https URLs only', () => {
  for (const value of ['ftp://x', 'file:///etc/passwd', 'ws://127.0.0.1:8080/v1', 'not a url', '']) {
    assertRejected({ CHATWIRE_OPENAI_BASE_URL: value }, 'expected an http:// or https:// URL');
  }
  assert.equal(loadConfig({ CHATWIRE_OPENAI_BASE_URL: 'http://127.0.0.1:11434/v1' }).openaiBaseUrl, 'http://127.0.0.1:11434/v1');
  assert.equal(loadConfig({ CHATWIRE_OPENAI_BASE_URL: 'https://api.openai.com/v1' }).openaiBaseUrl, 'https://api.openai.com/v1');
});

test("every setting has a row in the README's configuration table, with its default and its doc", () => {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  for (const [key, setting] of Object.entries(settings)) {
    // The default of CHATWIRE_WORKER_THREADS is this machine's core count, written as `cores`.
    const shown = setting.default === undefined ? '(unset)' : key === 'workerThreads' ? 'cores' : setting.default;
    const row = `| \`${setting.env}\` | \`${shown}\` | ${setting.doc.replaceAll('|', '\\|')} |`;
    assert.ok(readme.split('\n').includes(row), `README lacks the row\n${row}`);
  }
});

test('cluster mode needs both CHATWIRE_DATABASE_URL and CHATWIRE_REDIS_URL; one alone stops the start, naming both', () => {
  assert.equal(clusterMode(loadConfig({})), false);
  assert.equal(clusterMode(loadConfig({ CHATWIRE_DATABASE_URL: '', CHATWIRE_REDIS_URL: '' })), false);
  const both = loadConfig({ CHATWIRE_DATABASE_URL: 'postgres://db.internal/chatwire', CHATWIRE_REDIS_URL: 'redis://cache.internal:6379' });
  assert.equal(clusterMode(both), true);
  assert.equal(both.redisPrefix, 'chatwire:');
  assert.throws(
    () => loadConfig({ CHATWIRE_DATABASE_URL: 'postgres://db/chatwire' }),
    /CHATWIRE_DATABASE_URL is set but CHATWIRE_REDIS_URL is not; cluster mode needs both/,
  );
  assert.throws(() => loadConfig({ CHATWIRE_REDIS_URL: 'redis://cache' }), /CHATWIRE_REDIS_URL is set but CHATWIRE_DATABASE_URL is not/);
  assert.throws(
    () => loadConfig({ CHATWIRE_DATABASE_URL: 'mysql://db/x', CHATWIRE_REDIS_URL: 'redis://cache' }),
    /CHATWIRE_DATABASE_URL="mysql:\/\/db\/x": expected a postgres:\/\/ URL/,
  );
  assert.throws(
    () => loadConfig({ CHATWIRE_DATABASE_URL: 'postgres://db/x', CHATWIRE_REDIS_URL: 'http://cache' }),
    /CHATWIRE_REDIS_URL=.*expected a redis:\/\/ or rediss:\/\/ URL/,
  );
  assert.throws(() => loadConfig({ CHATWIRE_DATABASE_URL: ' ', CHATWIRE_REDIS_URL: 'redis://cache' }), /CHATWIRE_DATABASE_URL=" ": set but only whitespace/);
});
