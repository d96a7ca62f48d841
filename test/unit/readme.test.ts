import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { projectRoot } from '../../scripts/gen-docs.js';

const root = projectRoot();
const read = (file: string) => fs.readFileSync(path.join(root, file), 'utf8');
const pkg = JSON.parse(read('package.json')) as { description: string; scripts: Record<string, string> };
const markdownFiles = [
  ...fs.readdirSync(root).filter((f) => f.endsWith('.md')),
  ...fs
    .readdirSync(path.join(root, 'docs'))
    .filter((f) => f.endsWith('.md'))
    .map((f) => `docs/${f}`),
];

test("package.json's description is the README's opening sentence", () => {
  const opening = read('README.md').split('\n\n')[1]?.replaceAll('\n', ' ');
  assert.equal(opening, `chatwire is ${pkg.description[0]?.toLowerCase()}${pkg.description.slice(1)}`);
});

test('no path in the README or docs/ points outside the repository', () => {
  for (const file of markdownFiles) {
    for (const [relative] of read(file).matchAll(/(?:\.\.\/)+[\w.-][\w./-]*/g)) {
      const resolved = path.resolve(root, path.dirname(file), relative);
      assert.ok(resolved.startsWith(root + path.sep), `${file} points outside the repository: ${relative}`);
    }
  }
});

test('every benchmark and load script has its section in docs/performance.md, and the README links there', () => {
  const performance = read('docs/performance.md');
  const benchmarks = Object.keys(pkg.scripts).filter((name) => /^(bench:|load$|soak)/.test(name));
  assert.ok(benchmarks.length >= 8, `benchmarks found: ${benchmarks.join(', ')}`);
  for (const name of benchmarks) {
    assert.match(performance, new RegExp(`^## .*\`npm run ${name}\`$`, 'm'), `docs/performance.md has no section for npm run ${name}`);
  }
  assert.ok(read('README.md').includes('](docs/performance.md)'));
});
