import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { cacheKey, isCacheable, normalizeText, rawCacheKey, type CacheKeyInput } from '../../src/cache/cache-key.js';
import { backendFingerprint, upstreamIdentity } from '../../src/llm/backend.js';

function request(content: string, extra: Partial<CacheKeyInput> = {}): CacheKeyInput {
  return { provider: 'dev', backend: '', model: 'dev-1', temperature: 0, maxTokens: 32, messages: [{ role: 'user', content }], ...extra };
}

const keyOf = (content: string, extra: Partial<CacheKeyInput> = {}) => cacheKey(request(content, extra));

test('the key is the sha256 hex of a fixed rule (changing the rule must be deliberate: it empties every cache)', () => {
  const key = cacheKey({
    provider: 'openai',
    backend: 'http://127.0.0.1:11434/v1',
    model: 'dev-1',
    temperature: 0,
    maxTokens: 32,
    system: 'Be brief.',
    messages: [
      { role: 'user', content: 'Hello' },
      { role: 'assistant', content: 'Hi!' },
      { role: 'user', content: 'How much is a plumber?' },
    ],
  });
  assert.equal(key, '3a79a6506f45a19b147b6ba08d07cb21227de9459e4f24546e9ec8eb51c1c6d9');
  assert.match(rawCacheKey(request('x')), /^[0-9a-f]{64}$/);
});

test('NFC and NFD forms of the same text hit the same key', () => {
  const nfc = 'caf\u00e9 cr\u00e8me';
  const nfd = 'cafe\u0301 cre\u0300me';
  assert.notEqual(nfc, nfd);
  assert.equal(normalizeText(nfd), nfc);
  assert.equal(keyOf(nfd), keyOf(nfc));
});

test('CRLF and LF line ends hit the same key', () => {
  assert.equal(keyOf('line one\r\nline two\r\n'), keyOf('line one\nline two\n'));
});

test('tabs, runs of spaces and newlines fold to one space', () => {
  assert.equal(normalizeText('a\tb   c\n\nd \u00a0 e'), 'a b c d e');
  assert.equal(keyOf('find\ta   plumber'), keyOf('find a plumber'));
  assert.equal(keyOf('find\na plumber'), keyOf('find a plumber'));
});

test('leading and trailing white space is ignored', () => {
  assert.equal(normalizeText('  \t hello \r\n'), 'hello');
  assert.equal(keyOf('  hello\n'), keyOf('hello'));
});

test('emoji and other astral characters are kept intact', () => {
  const family = '\u{1F468}\u200D\u{1F469}\u200D\u{1F467}';
  assert.equal(normalizeText(`  hi ${family}  \u{1F44B}\u{1F3FD} `), `hi ${family} \u{1F44B}\u{1F3FD}`);
  assert.notEqual(keyOf('hi \u{1F44B}'), keyOf('hi \u{1F44D}'));
  assert.notEqual(keyOf('hi \u{1F44B}\u{1F3FD}'), keyOf('hi \u{1F44B}'));
});

test('a difference in case gives a different key', () => {
  assert.notEqual(keyOf('Hello'), keyOf('hello'));
});

test('a difference in punctuation gives a different key', () => {
  assert.notEqual(keyOf('Hello.'), keyOf('Hello'));
  assert.notEqual(keyOf('Hello, world'), keyOf('Hello world'));
});

test('every param that changes output changes the key', () => {
  const base = keyOf('hello');
  const variants = [
    keyOf('hello', { provider: 'openai' }),
    keyOf('hello', { backend: 'http://127.0.0.1:8080/v1' }),
    keyOf('hello', { model: 'dev-2' }),
    keyOf('hello', { temperature: 0.5 }),
    keyOf('hello', { temperature: undefined }),
    keyOf('hello', { maxTokens: 33 }),
    keyOf('hello', { maxTokens: undefined }),
  ];
  assert.equal(new Set([base, ...variants]).size, variants.length + 1);
});

test('the backend fingerprint names the upstream or the model file, never a secret', () => {
  const settings = { openaiBaseUrl: 'https://api.openai.com/v1', localContextSize: 2048 };
  assert.equal(backendFingerprint({ ...settings, llm: 'dev' }), '');
  assert.equal(backendFingerprint({ ...settings, llm: 'openai' }), 'https://api.openai.com/v1');
  assert.equal(backendFingerprint({ ...settings, llm: 'local' }, { identity: 'gguf-abc-10-20' }), 'gguf-abc-10-20 context=2048');
  assert.throws(() => backendFingerprint({ ...settings, llm: 'local' }));
  // The same upstream however it is spelled; user name, password and fragment dropped.
  for (const spelled of ['HTTPS://API.OpenAI.com:443/v1/', 'https://user:sk-secret@api.openai.com/v1#x']) {
    assert.equal(upstreamIdentity(spelled), 'https://api.openai.com/v1');
  }
  // Another scheme, host, port or path is another upstream.
  const others = [
    'http://api.openai.com/v1',
    'https://example.com/v1',
    'https://api.openai.com:8443/v1',
    'https://api.openai.com/v2',
    'https://api.openai.com/v1?api-version=2',
  ];
  assert.equal(new Set(others.map(upstreamIdentity)).size, others.length);
  assert.ok(!others.map(upstreamIdentity).includes('https://api.openai.com/v1'));
});

test('a different history gives a different key', () => {
  const one = cacheKey(request('and tomorrow?', { messages: [{ role: 'user', content: 'and tomorrow?' }] }));
  const withHistory = cacheKey({
    ...request(''),
    messages: [
      { role: 'user', content: 'weather today?' },
      { role: 'assistant', content: 'sunny' },
      { role: 'user', content: 'and tomorrow?' },
    ],
  });
  const otherHistory = cacheKey({
    ...request(''),
    messages: [
      { role: 'user', content: 'weather today?' },
      { role: 'assistant', content: 'rainy' },
      { role: 'user', content: 'and tomorrow?' },
    ],
  });
  assert.equal(new Set([one, withHistory, otherHistory]).size, 3);
});

test('message boundaries are part of the key: two messages differ from their joined text', () => {
  const split = cacheKey({
    ...request(''),
    messages: [
      { role: 'user', content: 'a' },
      { role: 'user', content: 'b' },
    ],
  });
  const joined = cacheKey({ ...request(''), messages: [{ role: 'user', content: 'a b' }] });
  assert.notEqual(split, joined);
});

test('the role of a message matters', () => {
  const asUser = cacheKey({ ...request(''), messages: [{ role: 'user', content: 'hello' }] });
  const asAssistant = cacheKey({ ...request(''), messages: [{ role: 'assistant', content: 'hello' }] });
  const asSystem = cacheKey({ ...request(''), messages: [{ role: 'system', content: 'hello' }] });
  assert.equal(new Set([asUser, asAssistant, asSystem]).size, 3);
});

test('the system prompt matters, and is normalized like the messages', () => {
  const none = keyOf('hello');
  const brief = keyOf('hello', { system: 'Be brief.' });
  const verbose = keyOf('hello', { system: 'Be verbose.' });
  assert.equal(new Set([none, brief, verbose]).size, 3);
  assert.equal(keyOf('hello', { system: '  Be\r\nbrief. ' }), brief);
});

test('the raw key uses the exact text: white space and Unicode form count', () => {
  assert.equal(rawCacheKey(request('hello')), rawCacheKey(request('hello')));
  assert.notEqual(rawCacheKey(request('a\r\nb')), rawCacheKey(request('a\nb')));
  assert.notEqual(rawCacheKey(request('caf\u00e9')), rawCacheKey(request('cafe\u0301')));
  assert.notEqual(rawCacheKey(request(' hello')), rawCacheKey(request('hello')));
  assert.notEqual(rawCacheKey(request('hello')), cacheKey(request('hello')));
});

test('normalization is idempotent and leaves no edge or doubled white space', () => {
  const unit = fc.oneof(
    fc.constantFrom(' ', '\t', '\n', '\r', '\u00a0', '\u2028', 'e', '\u0301', '\u00e9', '\u{1F44B}', '.'),
    fc.string({ unit: 'grapheme-composite', maxLength: 1 }),
  );
  fc.assert(
    fc.property(fc.string({ unit }), (s) => {
      const n = normalizeText(s);
      assert.equal(normalizeText(n), n);
      assert.equal(n, n.trim());
      assert.doesNotMatch(n, /\s\s|[\t\r\n]/u);
    }),
  );
});

test('adding white space around words never changes the normalized key', () => {
  const space = fc.constantFrom(' ', '  ', '\t', '\n', '\r\n', '\u00a0');
  fc.assert(
    fc.property(
      fc.array(fc.stringMatching(/^[A-Za-z0-9.,!?]{1,8}$/), { minLength: 1, maxLength: 6 }),
      fc.array(space, { minLength: 7, maxLength: 7 }),
      (words, spaces) => {
        const plain = words.join(' ');
        const spaced = spaces[0] + words.map((w, i) => w + (spaces[i + 1] ?? ' ')).join('');
        assert.equal(keyOf(spaced), keyOf(plain));
      },
    ),
  );
});

test('only reproducible requests are cacheable: temperature 0, or the dev provider', () => {
  assert.equal(isCacheable({ provider: 'dev' }), true);
  assert.equal(isCacheable({ provider: 'dev', temperature: 1.3 }), true);
  assert.equal(isCacheable({ provider: 'openai', temperature: 0 }), true);
  assert.equal(isCacheable({ provider: 'local', temperature: 0 }), true);
  assert.equal(isCacheable({ provider: 'openai' }), false);
  assert.equal(isCacheable({ provider: 'openai', temperature: 0.7 }), false);
  assert.equal(isCacheable({ provider: 'local', temperature: 0.01 }), false);
});
