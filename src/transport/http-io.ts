import crypto from 'node:crypto';
import type { HttpRequest, HttpResponse } from 'uWebSockets.js';
import { AppError, scanFrame, toAppError, type FrameBounds } from '../protocol/index.js';

/** What a handler may read of a request: uWS's HttpRequest is only valid until the first await. */
export interface RequestInfo {
  method: string;
  url: string;
  query: URLSearchParams;
  headers: Map<string, string>;
  params: string[];
  /** The TCP peer's address; see clientAddress() for the client behind a trusted proxy. */
  remoteAddress: string;
}

/**
 * A malformed escape (`/v1/tasks/%zz`) makes decodeURIComponent throw, and a throw inside a uWS route callback
 * kills the process: keep such a segment as it is, an id that names nothing (so not_found, or forbidden).
 */
function decodePathSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

export function captureRequest(req: HttpRequest, res: HttpResponse, paramCount = 0): RequestInfo {
  const headers = new Map<string, string>();
  req.forEach((k, v) => {
    headers.set(k, v);
  });
  const params: string[] = [];
  for (let i = 0; i < paramCount; i++) params.push(decodePathSegment(req.getParameter(i) ?? ''));
  return {
    method: req.getCaseSensitiveMethod ? req.getCaseSensitiveMethod() : req.getMethod().toUpperCase(),
    url: req.getUrl(),
    query: new URLSearchParams(req.getQuery() ?? ''),
    headers,
    params,
    remoteAddress: Buffer.from(res.getRemoteAddressAsText()).toString(),
  };
}

export const STATUS_TEXT: Record<number, string> = {
  200: '200 OK',
  202: '202 Accepted',
  204: '204 No Content',
  304: '304 Not Modified',
  400: '400 Bad Request',
  401: '401 Unauthorized',
  403: '403 Forbidden',
  404: '404 Not Found',
  405: '405 Method Not Allowed',
  413: '413 Payload Too Large',
  429: '429 Too Many Requests',
  500: '500 Internal Server Error',
  502: '502 Bad Gateway',
  503: '503 Service Unavailable',
  504: '504 Gateway Timeout',
};

/**
 * A response that knows whether the client went away (uWS forbids touching an
 * aborted response) and writes status, headers and body in one corked call.
 */
export class Responder {
  aborted = false;
  done = false;
  private readonly abortHandlers: (() => void)[] = [];

  constructor(readonly res: HttpResponse) {
    res.onAborted(() => {
      this.aborted = true;
      for (const h of this.abortHandlers) h();
    });
  }

  onAbort(handler: () => void): void {
    this.abortHandlers.push(handler);
  }

  get open(): boolean {
    return !this.aborted && !this.done;
  }

  /** `closeConnection`: close the TCP connection after this answer instead of keeping it alive. */
  send(status: number, headers: Record<string, string>, body: string | Buffer = '', closeConnection = false): void {
    if (!this.open) return;
    this.done = true;
    this.res.cork(() => {
      this.res.writeStatus(STATUS_TEXT[status] ?? `${status} Status`);
      for (const [k, v] of Object.entries(headers)) this.res.writeHeader(k, v);
      this.res.end(body, closeConnection);
    });
  }
}

/** Reads a request body up to `maxBytes`; past it, rejects with payload_too_large. Copies each chunk (uWS reuses them). */
export function readBody(responder: Responder, maxBytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let failed = false;
    responder.onAbort(() => reject(new AppError('bad_request', 'the client went away')));
    responder.res.onData((chunk, isLast) => {
      if (failed) return;
      size += chunk.byteLength;
      if (size > maxBytes) {
        failed = true;
        reject(new AppError('payload_too_large', `body over ${maxBytes} bytes`));
        return;
      }
      chunks.push(Buffer.from(new Uint8Array(chunk.slice(0))));
      if (isLast) resolve(Buffer.concat(chunks));
    });
  });
}

/** Decodes a JSON body; with `bounds`, one with more structure than they allow is refused undecoded (see scanFrame). */
export function parseJsonBody(body: Buffer, bounds?: FrameBounds): unknown {
  if (body.length === 0) throw new AppError('bad_request', 'the request needs a JSON body');
  const text = body.toString('utf8');
  if (bounds !== undefined) {
    const shape = scanFrame(text, bounds);
    if (!shape.ok) throw new AppError('bad_request', shape.reason.replace(/^frame/, 'body'));
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new AppError('bad_request', 'the body is not valid JSON');
  }
}

export function errorBody(err: unknown): { status: number; body: string; retryAfterMs?: number } {
  const e = toAppError(err);
  const error: Record<string, unknown> = { code: e.code, message: e.message };
  if (e.retryAfterMs !== undefined) error.retryAfterMs = Math.max(0, Math.ceil(e.retryAfterMs));
  if (e.details !== undefined) error.details = e.details;
  const out: { status: number; body: string; retryAfterMs?: number } = { status: e.status, body: JSON.stringify({ error }) };
  if (e.retryAfterMs !== undefined) out.retryAfterMs = e.retryAfterMs;
  return out;
}

/** A strong validator of the exact bytes of a representation. */
export function strongEtag(body: string): string {
  return '"' + crypto.createHash('sha256').update(body).digest('base64url').slice(0, 32) + '"';
}

/** RFC 9110 If-None-Match: a list of entity tags or `*`; weak comparison is fine for GET. */
export function etagMatches(ifNoneMatch: string | undefined, etag: string): boolean {
  if (!ifNoneMatch) return false;
  if (ifNoneMatch.trim() === '*') return true;
  return ifNoneMatch.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}
