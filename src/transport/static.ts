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
  /** Extra response headers, e.g. CORS for what other origins may load. */
  headers?: Record<string, string>;
}

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.json': 'application/json',
};

const REVALIDATE = 'public, max-age=0, must-revalidate';
// Public and credential-free: any origin may import the client library or read the API description.
const ANY_ORIGIN = { 'access-control-allow-origin': '*' };

/**
 * The client library (/client.js) and the page's module (/chat-page.js) as
 * tsc compiled them beside this file's own output (dist/src/client/), so
 * the browser needs no bundler; and the OpenAPI document from docs/.
 */
function builtAssets(): StaticAsset[] {
  const compiled = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'client');
  return [
    { route: '/client.js', file: path.join(compiled, 'client.js'), contentType: TYPES['.js'] as string, cacheControl: REVALIDATE, headers: ANY_ORIGIN },
    { route: '/chat-page.js', file: path.join(compiled, 'chat-page.js'), contentType: TYPES['.js'] as string, cacheControl: REVALIDATE },
    {
      route: '/openapi.json',
      file: path.join(projectRoot(), 'docs', 'openapi.json'),
      contentType: TYPES['.json'] as string,
      cacheControl: REVALIDATE,
      headers: ANY_ORIGIN,
    },
  ];
}

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
  const files = fs.existsSync(dir) ? fs.readdirSync(dir) : [];
  const pub = files.flatMap((name) => {
    const type = TYPES[path.extname(name)];
    if (!type) return [];
    const route = name === 'index.html' ? '/' : `/${name}`;
    return [{ route, file: path.join(dir, name), contentType: type, cacheControl: REVALIDATE }];
  });
  return [...pub, ...builtAssets()];
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
  const headers = {
    ...asset.headers,
    'content-type': asset.contentType,
    'cache-control': asset.cacheControl,
    etag: entry.etag,
    'x-content-type-options': 'nosniff',
  };
  if (etagMatches(ifNoneMatch, entry.etag)) responder.send(304, headers);
  else responder.send(200, headers, entry.body);
}
