import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Responder } from './http-io.js';
import { etagMatches, strongEtag } from './http-io.js';

export interface StaticAsset {
  route: string;
  file: string;
  contentType: string;
  cacheControl: string;
}

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
};

/** The project root, from both src/transport and dist/src/transport. */
function projectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error('project root not found');
}

/** The browser page and its assets: src/client/public/* served as files, revalidated by ETag. */
export function staticAssets(): StaticAsset[] {
  const dir = path.join(projectRoot(), 'src', 'client', 'public');
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir).flatMap((name) => {
    const type = TYPES[path.extname(name)];
    if (!type) return [];
    const route = name === 'index.html' ? '/' : `/${name}`;
    return [{ route, file: path.join(dir, name), contentType: type, cacheControl: 'public, max-age=0, must-revalidate' }];
  });
}

const loaded = new Map<string, { body: Buffer; etag: string; mtimeMs: number }>();

export function renderStaticRoute(responder: Responder, asset: StaticAsset, ifNoneMatch: string): void {
  const stat = fs.statSync(asset.file, { throwIfNoEntry: false });
  if (!stat) {
    responder.send(404, { 'content-type': 'text/plain' }, 'not found');
    return;
  }
  let entry = loaded.get(asset.file);
  if (!entry || entry.mtimeMs !== stat.mtimeMs) {
    const body = fs.readFileSync(asset.file);
    entry = { body, etag: strongEtag(body.toString('latin1')), mtimeMs: stat.mtimeMs };
    loaded.set(asset.file, entry);
  }
  const headers = { 'content-type': asset.contentType, 'cache-control': asset.cacheControl, etag: entry.etag, 'x-content-type-options': 'nosniff' };
  if (etagMatches(ifNoneMatch, entry.etag)) responder.send(304, headers);
  else responder.send(200, headers, entry.body);
}
