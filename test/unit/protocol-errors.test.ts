import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { AppError, errorCatalogue, toAppError } from '../../src/protocol/index.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** Rows of the markdown table whose header is `| code | when | HTTP |`: code → HTTP statuses. */
function documentedCodes(markdown: string): Map<string, number[]> {
  const lines = markdown.split('\n');
  const start = lines.findIndex((l) => /^\|\s*code\s*\|\s*when\s*\|\s*HTTP\s*\|/.test(l));
  assert.ok(start >= 0, 'an error table `| code | when | HTTP |`');
  const rows = new Map<string, number[]>();
  for (const line of lines.slice(start + 2)) {
    if (!line.startsWith('|')) break;
    const cells = line.split('|').map((c) => c.trim());
    const codes = [...(cells[1] ?? '').matchAll(/`([a-z_]+)`/g)].map((m) => m[1] as string);
    const statuses = [...(cells.at(-2) ?? '').matchAll(/\d{3}/g)].map((m) => Number(m[0]));
    for (const [i, code] of codes.entries()) rows.set(code, [statuses[Math.min(i, statuses.length - 1)] as number]);
  }
  return rows;
}

function assertSameTable(markdown: string, where: string): void {
  const documented = documentedCodes(markdown);
  assert.deepEqual([...documented.keys()].sort(), Object.keys(errorCatalogue).sort(), `${where}: the same codes`);
  for (const [code, [status]] of documented) {
    assert.equal(errorCatalogue[code as keyof typeof errorCatalogue].status, status, `${where}: HTTP status of ${code}`);
  }
}

test('the error catalogue agrees with the error table in docs/protocol.md', () => {
  assertSameTable(fs.readFileSync(path.join(ROOT, 'docs', 'protocol.md'), 'utf8'), 'docs/protocol.md');
});

test('the error catalogue agrees with the shared PROTOCOL.md contract', (t) => {
  const contract = path.join(ROOT, '..', 'shared', 'PROTOCOL.md');
  if (!fs.existsSync(contract)) {
    t.skip(`${contract} is not beside this checkout`);
    return;
  }
  assertSameTable(fs.readFileSync(contract, 'utf8'), 'PROTOCOL.md');
});

test('anything that is not an AppError becomes internal with no detail of the cause', () => {
  const e = toAppError(new Error('secret stack detail'));
  assert.equal(e.code, 'internal');
  assert.equal(e.message, 'internal error');
  assert.equal(e.status, 500);
  const known = new AppError('rate_limited', 'slow down', { retryAfterMs: 1200 });
  assert.equal(toAppError(known), known);
  assert.equal(known.retryable, true);
  assert.equal(known.status, 429);
});
