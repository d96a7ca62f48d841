import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { clientSize, fillSections, projectRoot, renderDocs } from '../../scripts/gen-docs.js';
import { errorCatalogue, errorCodes } from '../../src/protocol/index.js';

const root = projectRoot();
const read = (file: string) => fs.readFileSync(path.join(root, file), 'utf8');

test('docs/protocol.md, docs/openapi.json and docs/client.md are what `npm run docs` generates from the schemas', () => {
  const generated = renderDocs(root);
  for (const [file, content] of Object.entries(generated)) {
    assert.ok(read(file) === content, `${file} is stale: run \`npm run docs\` (node dist/scripts/gen-docs.js)`);
  }
});

test('the error table of docs/protocol.md has every code of the catalogue with its HTTP status, and nothing else', () => {
  const rows = [...read('docs/protocol.md').matchAll(/^\| `([a-z_]+)` \| (.+) \| (\d{3}) \|$/gm)].map((m) => [m[1], Number(m[3])]);
  assert.deepEqual(
    rows,
    errorCodes.map((code) => [code, errorCatalogue[code].status]),
  );
});

test('every error code has an example in docs/protocol.md and in the OpenAPI document', () => {
  const md = read('docs/protocol.md');
  const api = JSON.parse(read('docs/openapi.json')) as {
    components: { responses: Record<string, { content: { 'application/json': { examples: Record<string, unknown> } } }> };
  };
  const inApi = Object.values(api.components.responses).flatMap((r) => Object.keys(r.content['application/json'].examples));
  for (const code of errorCodes) {
    assert.ok(md.includes(`### \`${code}\``), `no example section for ${code}`);
    assert.ok(md.includes(`{"error":{"code":"${code}"`), `no HTTP body example for ${code}`);
    assert.ok(inApi.includes(code), `no OpenAPI example for ${code}`);
  }
});

test('the OpenAPI document is 3.1, every $ref in it resolves, and it covers the /v1 and /api/chat routes the server registers', () => {
  const api = JSON.parse(read('docs/openapi.json')) as Record<string, unknown> & { openapi: string; paths: Record<string, unknown> };
  assert.equal(api.openapi, '3.1.0');
  const refs: string[] = [];
  const walk = (v: unknown): void => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (typeof v === 'object' && v !== null) {
      for (const [k, x] of Object.entries(v)) {
        if (k === '$ref' && typeof x === 'string') refs.push(x);
        else walk(x);
      }
    }
  };
  walk(api);
  assert.ok(refs.length > 20);
  for (const r of new Set(refs)) {
    const target = r
      .replace(/^#\//, '')
      .split('/')
      .reduce<unknown>((node, key) => (node as Record<string, unknown> | undefined)?.[key], api);
    assert.ok(target !== undefined, `unresolved ${r}`);
  }
  // The routes as http-routes.ts and openai-routes.ts register them (`:param` there, `{param}` here).
  const source = read('src/transport/http-routes.ts') + read('src/transport/openai-routes.ts');
  const registered = [...source.matchAll(/(?:v1\('(?:get|post)',|app\.(?:get|post)\()\s*'(\/v1\/[^']+)'/g)].map((m) =>
    (m[1] as string).replace(/:(\w+)/g, '{$1}'),
  );
  assert.ok(registered.length >= 9);
  for (const route of registered) assert.ok(route in api.paths, `${route} is not in docs/openapi.json`);
  const aiSdk = [...read('src/transport/ai-sdk-routes.ts').matchAll(/aiSdkRoute\(routes, '(?:get|post)', '(\/api\/chat[^']*)'/g)].map((m) =>
    (m[1] as string).replace(/:(\w+)/g, '{$1}'),
  );
  assert.equal(aiSdk.length, 3);
  for (const route of aiSdk) assert.ok(route in api.paths, `${route} is not in docs/openapi.json`);
});

test('a generated block that is missing from a doc is an error, not silently skipped', () => {
  assert.throws(() => fillSections('# no markers', { errors: 'x' }, 'doc.md'), /doc\.md has no <!-- generated:errors -->/);
  assert.equal(
    fillSections('a\n<!-- generated:x -->\nold\n<!-- /generated:x -->\nb', { x: 'new' }, 'doc.md'),
    'a\n<!-- generated:x -->\nnew\n<!-- /generated:x -->\nb',
  );
});

test('the client library stays tiny: under 8 KiB gzipped', () => {
  const size = clientSize(root);
  assert.ok(size.strippedGzipBytes < 8 * 1024, `${size.strippedGzipBytes} bytes`);
  assert.ok(size.strippedGzipBytes <= size.jsGzipBytes);
});
