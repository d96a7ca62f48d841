import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { ConfigError, loadConfig, settings } from '../../src/config.js';

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
  const config = loadConfig({ PORT: '9000', CHATWIRE_DEV_TOKEN_DELAY_MS: '0', CHATWIRE_LLM: 'openai', CHATWIRE_DEV_FAULTS: 'true', CHATWIRE_JWT_SECRET: 's3cret' });
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

test("every setting has a row in the README's configuration table", () => {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  for (const setting of Object.values(settings)) {
    assert.match(readme, new RegExp('^\\| `' + setting.env + '` \\|', 'm'), `README lacks ${setting.env}`);
  }
});
