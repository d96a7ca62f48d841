import type { HttpRequest, HttpResponse, TemplatedApp } from 'uWebSockets.js';
import { z } from 'zod';
import { tokenFromAuthorization } from '../auth/credentials.js';
import type { Identity } from '../auth/identity.js';
import {
  AppError,
  badRequestFromZod,
  CLIENT_MESSAGE_BOUNDS,
  isAppError,
  ChatSendBodySchema,
  ConsumerPageFields,
  ConversationsListFields,
  HistoryQueryFields,
  RequestsListFields,
  JsonText,
  LimitSchema,
  serializePage,
  toAppError,
  toJson,
} from '../protocol/index.js';
import { callerAddress, identifyPending, takeUserSlot } from './connection.js';
import type { TransportDeps } from './deps.js';
import { captureRequest, errorBody, etagMatches, parseJsonBody, readBody, Responder, strongEtag, type RequestInfo } from './http-io.js';
import { attachAiSdkRoutes } from './ai-sdk-routes.js';
import { idempotencyKey, REPLAYED_HEADER } from './idempotency-key.js';
import { attachOpenAIRoutes } from './openai-routes.js';
import { chargeEgress, historyBytes, taskBytes } from './session.js';
import { renderStaticRoute, staticAssets } from './static.js';
import { TaskEventStream, type SseEncoding } from './task-event-stream.js';

/**
 * An integer in a query string: decimal digits only, then the field's own schema. Number() alone would take '',
 * ' 3', '1e2', '0x10' and '3.0' too, and z.coerce takes anything Number() takes.
 */
function queryInteger<T extends z.ZodType<number, number>>(field: T) {
  return z
    .string()
    .regex(/^[0-9]+$/, 'expected an integer in decimal digits')
    .transform(Number)
    .pipe(field);
}

const QueryLimit = queryInteger(LimitSchema).optional();
const HistoryQuerySchema = z.strictObject({ before: HistoryQueryFields.before, limit: QueryLimit });
const RequestsQuerySchema = z.strictObject({ ...RequestsListFields, limit: QueryLimit });
const ConsumerPageQuerySchema = z.strictObject({ limit: QueryLimit, cursor: ConsumerPageFields.cursor });
const ConversationsQuerySchema = z.strictObject({ limit: QueryLimit, cursor: ConversationsListFields.cursor });

/** How fresh each kind of read may be kept by a client or a private cache. */
const FRESHNESS = {
  // Conversations and tasks change whenever a chat runs: always revalidate (cheap with ETags).
  live: 'private, no-cache',
  // A finished task never changes again.
  final: 'private, max-age=300',
  // Marketplace listings tolerate a few seconds of staleness.
  listing: 'private, max-age=5, must-revalidate',
} as const;

function queryObject(query: URLSearchParams): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of query) out[k] = v;
  return out;
}

function parseQuery<T>(schema: z.ZodType<T>, query: URLSearchParams, drop: string[] = ['user', 'token']): T {
  const raw = queryObject(query);
  for (const k of drop) delete raw[k];
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw badRequestFromZod(parsed.error, 'query');
  return parsed.data;
}

/** Every response to one of these paths carries the RateLimit fields (PROTOCOL.md, HTTP). */
function isV1Path(url: string): boolean {
  return url === '/v1' || url.startsWith('/v1/');
}

/** Whether a uWS route pattern matches a path: `:name` matches one non-empty segment, as uWS matches it. */
function patternMatches(pattern: string, url: string): boolean {
  const want = pattern.split('/');
  const got = url.split('/');
  return want.length === got.length && want.every((seg, i) => (seg.startsWith(':') ? got[i] !== '' : seg === got[i]));
}

interface Handled {
  status: number;
  /** Sent as JSON.stringify(body), or as it is when it is JsonText. */
  body: unknown;
  cacheControl?: string;
  headers?: Record<string, string>;
}

/** A /v1 JSON route's handler: the identified caller, the request, and its body (empty for a GET). */
type V1Handler = (caller: Identity, info: RequestInfo, body: Promise<Buffer>) => Promise<Handled | null>;

/** What every route shares: the app, the deps, the open task streams and the helpers that identify, charge and answer. */
export interface Routes {
  app: TemplatedApp;
  deps: TransportDeps;
  /** The task streams open now, ended by closeStreams(). */
  streams: Set<{ end(): void }>;
  /** The /v1 routes with the method each answers, for the 405 of a known path asked with another method. */
  v1Routes: { method: string; pattern: string }[];
  /**
   * The fields of a caller that could not be identified: no bucket of its own, so the limits a user starts with.
   * They depend only on the configured policies, so they are the same for the whole life of the process.
   */
  unidentifiedLimitHeaders: Record<string, string>;
  commonHeaders(info: RequestInfo): Record<string, string>;
  /**
   * Who the caller is; while its token is checked the request holds a place among the unauthenticated (deps.admission).
   * `user`: the open-mode user id a route read from its body, in place of `?user=`.
   */
  identify(info: RequestInfo, user?: string): Promise<Identity>;
  /** Identifies the caller and takes one request from its bucket; `onHeaders` gets the RateLimit fields either way. */
  admit(info: RequestInfo, onHeaders: (headers: Record<string, string>) => void, user?: string): Promise<Identity>;
  /** `status` overrides the code's own HTTP status: only the 405 does, whose condition the code table has no row for. */
  sendError(responder: Responder, info: RequestInfo, err: unknown, extra?: Record<string, string>, status?: number): void;
}

function corsOrigin(deps: TransportDeps, origin: string | undefined): string | undefined {
  if (!origin) return undefined;
  if (deps.config.allowedOrigins === '*') return '*';
  return deps.config.allowedOrigins.includes(origin) ? origin : undefined;
}

function commonHeaders(deps: TransportDeps, info: RequestInfo): Record<string, string> {
  const h: Record<string, string> = { 'x-content-type-options': 'nosniff' };
  const allow = corsOrigin(deps, info.headers.get('origin'));
  if (allow) {
    h['access-control-allow-origin'] = allow;
    h['access-control-expose-headers'] =
      'RateLimit, RateLimit-Policy, Retry-After, ETag, retry-after-ms, x-request-id, Cache-Status, x-chatwire-conversation-id, Idempotent-Replayed';
    if (allow !== '*') h.vary = 'Origin';
  }
  return h;
}

function createRoutes(app: TemplatedApp, deps: TransportDeps): Routes {
  const { metrics, log } = deps;
  let nextAnon = 0;
  const routes: Routes = {
    app,
    deps,
    streams: new Set(),
    v1Routes: [],
    unidentifiedLimitHeaders: deps.rateLimitHeaders(null),
    commonHeaders: (info) => commonHeaders(deps, info),
    identify(info, user) {
      const address = callerAddress(deps, info.remoteAddress, info.headers.get('x-forwarded-for'));
      const pending = deps.admission.admit(address);
      if (!pending.ok) return Promise.reject(pending.error);
      return identifyPending(deps, pending.slot, {
        token: tokenFromAuthorization(info.headers.get('authorization')) ?? info.query.get('token') ?? undefined,
        user: user ?? info.query.get('user') ?? undefined,
        connectionId: `http${++nextAnon}`,
        address,
        request: { transport: 'http', headers: info.headers, query: info.query },
      });
    },
    async admit(info, onHeaders, user) {
      const caller = await routes.identify(info, user);
      const limited = deps.httpLimit(caller.userId);
      onHeaders(deps.rateLimitHeaders(caller.userId));
      if (!limited.ok) {
        metrics.rateLimited.inc({ bucket: limited.bucket });
        throw new AppError('rate_limited', `too many requests; retry in ${limited.retryAfterMs} ms`, { retryAfterMs: limited.retryAfterMs });
      }
      return caller;
    },
    sendError(responder, info, err, extra = {}, status) {
      const e = toAppError(err);
      if (e.code === 'internal') log.error({ err: e.cause ?? e, url: info.url }, 'http request failed');
      metrics.errors.inc({ code: e.code });
      const { status: codeStatus, body, retryAfterMs } = errorBody(e);
      status ??= codeStatus;
      const headers: Record<string, string> = { ...commonHeaders(deps, info), ...extra, 'content-type': 'application/json', 'cache-control': 'no-store' };
      if (retryAfterMs !== undefined) headers['retry-after'] = String(Math.max(1, Math.ceil(retryAfterMs / 1000)));
      // RFC 9110 section 15.5.2: a 401 names the scheme that would be accepted.
      if (status === 401) headers['www-authenticate'] = 'Bearer';
      // RFC 9110 section 9.3.2: no content in an answer to HEAD (uWS would write it, and a client reading the
      // connection on would take it for the start of the next response).
      responder.send(status, headers, info.method === 'HEAD' ? '' : body, deps.admission.closesConnection(e));
    },
  };
  return routes;
}

/** A /v1 route's answer: JSON with the RateLimit fields, and on reads an ETag (304 when the client has it). */
function sendHandled(
  routes: Routes,
  responder: Responder,
  info: RequestInfo,
  method: 'get' | 'post',
  out: Handled,
  limitHeaders: Record<string, string>,
): void {
  const body = toJson(out.body);
  const headers: Record<string, string> = { ...routes.commonHeaders(info), ...limitHeaders, ...out.headers, 'content-type': 'application/json' };
  if (method === 'get') {
    const etag = strongEtag(body);
    headers.etag = etag;
    headers['cache-control'] = out.cacheControl ?? FRESHNESS.live;
    if (etagMatches(info.headers.get('if-none-match'), etag)) {
      responder.send(304, headers);
      return;
    }
  } else {
    headers['cache-control'] = 'no-store';
  }
  responder.send(out.status, headers, body);
}

/** A /v1 JSON route: identity, rate limit, handler, RateLimit fields, ETag on reads. */
function v1Route(routes: Routes, method: 'get' | 'post', pattern: string, params: number, handler: V1Handler): void {
  const { deps } = routes;
  routes.v1Routes.push({ method: method.toUpperCase(), pattern });
  routes.app[method](pattern, (res: HttpResponse, req: HttpRequest) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res, params);
    // uWS hands body chunks only to an onData registered before this callback returns, and identify() awaits
    // (HS256 verification): read the body now or it is lost and the request hangs. A refusal before the handler
    // reads it leaves the promise unobserved, hence the no-op catch.
    const requestBody = method === 'post' ? readBody(responder, deps.config.maxFrameBytes) : Promise.resolve(Buffer.alloc(0));
    requestBody.catch(() => {});
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        const caller = await routes.admit(info, (h) => (limitHeaders = h));
        const out = await handler(caller, info, requestBody);
        if (out === null || !responder.open) return;
        // Read again after the handler: the chat (and model tokens) it just took must show in the fields.
        limitHeaders = deps.rateLimitHeaders(caller.userId);
        sendHandled(routes, responder, info, method, out, limitHeaders);
      } catch (err) {
        routes.sendError(responder, info, err, limitHeaders);
      }
    })();
  });
}

/** The /v1 JSON routes: send a chat, read a task, a conversation's history and the marketplace listings. */
function attachV1Routes(routes: Routes): void {
  const { deps } = routes;
  const { chat, marketplace } = deps;
  const v1 = (method: 'get' | 'post', pattern: string, params: number, handler: V1Handler) => v1Route(routes, method, pattern, params, handler);
  v1('post', '/v1/chat', 0, async (caller, info, body) => {
    const contentType = info.headers.get('content-type') ?? '';
    if (contentType && !/^application\/json\b/i.test(contentType)) throw new AppError('bad_request', 'the body must be application/json');
    const raw = parseJsonBody(await body, CLIENT_MESSAGE_BOUNDS);
    const parsed = ChatSendBodySchema.safeParse(raw);
    if (!parsed.success) throw badRequestFromZod(parsed.error, 'chat');
    const { id, ...message } = parsed.data;
    const clientMessageId = idempotencyKey(info, message.clientMessageId);
    const sent = await chat.send(caller, clientMessageId === undefined ? message : { ...message, clientMessageId });
    // A repeat: the first answer's status and body, marked by the header.
    const { duplicate: _duplicate, ...ack } = sent.ack;
    return {
      status: 202,
      body: id === undefined ? ack : { id, ...ack },
      headers: sent.duplicate ? { [REPLAYED_HEADER]: 'true' } : undefined,
    };
  });

  v1('get', '/v1/conversations', 0, async (caller, info) => {
    const q = parseQuery(ConversationsQuerySchema, info.query);
    return { status: 200, body: await chat.conversations(caller, q) };
  });

  v1('get', '/v1/tasks/:taskId', 1, async (caller, info) => {
    const task = await chat.task(caller, info.params[0] as string);
    chargeEgress(deps.session, caller.userId, taskBytes(task));
    const final = task.status === 'done' || task.status === 'error' || task.status === 'cancelled';
    return { status: 200, body: task, cacheControl: final ? FRESHNESS.final : FRESHNESS.live };
  });

  v1('get', '/v1/conversations/:conversationId/messages', 1, async (caller, info) => {
    const q = parseQuery(HistoryQuerySchema, info.query);
    const page = await chat.history(caller, info.params[0] as string, q.before, q.limit ?? 50);
    chargeEgress(deps.session, caller.userId, historyBytes(page));
    return { status: 200, body: page };
  });

  v1('get', '/v1/requests', 0, async (caller, info) => {
    const q = parseQuery(RequestsQuerySchema, info.query);
    return { status: 200, body: new JsonText(serializePage(await marketplace.requestsListJson(caller, q))), cacheControl: FRESHNESS.listing };
  });

  v1('get', '/v1/consumers/:consumerId/requests', 1, async (caller, info) => {
    const q = parseQuery(ConsumerPageQuerySchema, info.query);
    return {
      status: 200,
      body: new JsonText(serializePage(await marketplace.consumerRequestsJson(caller, { consumerId: info.params[0] as string, ...q }))),
      cacheControl: FRESHNESS.listing,
    };
  });

  v1('get', '/v1/consumers/:consumerId/bookings', 1, async (caller, info) => {
    const q = parseQuery(ConsumerPageQuerySchema, info.query);
    return {
      status: 200,
      body: new JsonText(serializePage(await marketplace.consumerBookingsJson(caller, { consumerId: info.params[0] as string, ...q }))),
      cacheControl: FRESHNESS.listing,
    };
  });
}

/** The seq a stream starts from: the one after Last-Event-ID (the header, or `?lastEventId=`), else 0. */
function streamStart(info: RequestInfo): number {
  const lastEventId = info.headers.get('last-event-id') ?? info.query.get('lastEventId');
  if (lastEventId === null || lastEventId === undefined || lastEventId === '') return 0;
  const n = Number(lastEventId);
  if (!Number.isSafeInteger(n) || n < 0) throw new AppError('bad_request', 'Last-Event-ID must be the seq of a delta');
  return n + 1;
}

/** chatwire's own task stream: deltas as `delta` events whose `id:` is the seq, then `done` or `error`. */
const V1_TASK_EVENTS: SseEncoding = {
  opening: ': chatwire task stream\n\n',
  events: (m) =>
    m.type === 'chat.delta'
      ? `id: ${m.seq}\nevent: delta\ndata: ${JSON.stringify(m)}\n\n`
      : `event: ${m.type === 'chat.done' ? 'done' : 'error'}\ndata: ${JSON.stringify(m)}\n\n`,
};

/** Server-Sent Events: `id:` is the seq, Last-Event-ID resumes after it, the stream ends after done or error. */
function attachTaskStream(routes: Routes): void {
  const { deps } = routes;
  routes.v1Routes.push({ method: 'GET', pattern: '/v1/tasks/:taskId/stream' });
  routes.app.get('/v1/tasks/:taskId/stream', (res, req) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res, 1);
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        const caller = await routes.admit(info, (h) => (limitHeaders = h));
        const fromSeq = streamStart(info);
        if (!responder.open) return;
        // A stream holds a connection as long as a WebSocket does: it takes one of the user's connection slots.
        const releaseSlot = await takeUserSlot(deps, caller.userId);
        // The client may have gone while the slot was taken.
        if (!responder.open) return releaseSlot();
        const stream = new TaskEventStream(res, responder, routes.streams, releaseSlot, V1_TASK_EVENTS);
        await stream.subscribe(deps.chat, caller, info.params[0] as string, fromSeq, (bytes) => chargeEgress(deps.session, caller.userId, bytes));
        // The client may have gone while the task was looked up: let go of its slot and subscription.
        if (!responder.open) return stream.end();
        stream.start({
          ...routes.commonHeaders(info),
          ...limitHeaders,
          'content-type': 'text/event-stream; charset=utf-8',
          'cache-control': 'no-store',
          'x-accel-buffering': 'no',
        });
      } catch (err) {
        routes.sendError(responder, info, err, limitHeaders);
      }
    })();
  });
}

/**
 * CORS preflights. A preflight is the browser's, sent on its own before the page's request (which is charged): it
 * charges nothing, and a bad token does not fail it. Browsers send it without credentials, so it is usually an
 * unidentified caller; one that names its user (?user=, ?token=) gets that user's state.
 */
function attachPreflight(routes: Routes): void {
  const { deps } = routes;
  routes.app.options('/*', (res, req) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res);
    const headers = {
      ...routes.commonHeaders(info),
      'access-control-allow-methods': 'GET, POST, OPTIONS',
      'access-control-allow-headers':
        'authorization, content-type, last-event-id, if-none-match, x-chatwire-conversation-id, x-chatwire-cache, idempotency-key',
      'access-control-max-age': '600',
    };
    if (!isV1Path(info.url)) {
      responder.send(204, headers);
      return;
    }
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        limitHeaders = deps.rateLimitHeaders((await routes.identify(info)).userId);
      } catch (err) {
        // A bad token, a refused admission or an anonymous caller past the bound is the caller's; anything else is ours.
        if (!isAppError(err) || err.code === 'internal') deps.log.error({ err, url: info.url }, 'identifying a preflight failed');
      }
      responder.send(204, { ...headers, ...limitHeaders });
    })();
  });
}

/** /healthz, /readyz and /metrics. */
function attachProbes(routes: Routes): void {
  const { app, deps } = routes;
  app.get('/healthz', (res) => {
    new Responder(res).send(200, { 'content-type': 'application/json', 'cache-control': 'no-store' }, '{"status":"ok"}');
  });

  app.get('/readyz', (res) => {
    const responder = new Responder(res);
    void (async () => {
      const failures: Record<string, string> = {};
      const degraded: Record<string, string> = {};
      await Promise.all(
        deps.readiness.map(async (r) => {
          try {
            await r.check();
          } catch (err) {
            (r.optional ? degraded : failures)[r.name] = err instanceof Error ? err.message : String(err);
          }
        }),
      );
      const ok = Object.keys(failures).length === 0;
      const marks = Object.fromEntries(Object.keys(degraded).map((name) => [name, 'degraded']));
      const soft = Object.keys(degraded).length > 0 ? { ...marks, degraded } : {};
      const body = JSON.stringify(ok ? { status: 'ready', ...soft } : { status: 'not ready', failures, ...soft });
      responder.send(ok ? 200 : 503, { 'content-type': 'application/json', 'cache-control': 'no-store' }, body);
    })();
  });

  app.get('/metrics', (res) => {
    const responder = new Responder(res);
    deps.beforeScrape();
    deps.metrics.registry.metrics().then(
      (text) => responder.send(200, { 'content-type': deps.metrics.registry.contentType, 'cache-control': 'no-store' }, text),
      (err: unknown) => {
        deps.log.error({ err }, 'rendering metrics failed');
        responder.send(500, { 'content-type': 'text/plain' }, 'metrics unavailable');
      },
    );
  });
}

/**
 * Every other request: not_found outside /v1. Under /v1 a miss is a /v1 call like any other: the caller is
 * identified and charged one frame first (a client probing wrong paths spends its quota as it would on right ones),
 * and the answer carries the fields; a known path asked with another method is answered 405.
 */
function attachFallback(routes: Routes): void {
  routes.app.any('/*', (res, req) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res);
    if (!isV1Path(info.url)) {
      routes.sendError(responder, info, new AppError('not_found', `no route ${info.method} ${info.url}`));
      return;
    }
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        await routes.admit(info, (h) => (limitHeaders = h));
        const allowed = [...new Set(routes.v1Routes.filter((r) => patternMatches(r.pattern, info.url)).map((r) => r.method))];
        if (allowed.length === 0) throw new AppError('not_found', `no route ${info.method} ${info.url}`);
        // RFC 9110 section 15.5.6: 405 with Allow. OPTIONS is in it because every path answers a preflight.
        const allow = [...allowed, 'OPTIONS'].join(', ');
        const err = new AppError('bad_request', `${info.method} is not allowed on ${info.url}; allowed: ${allow}`);
        routes.sendError(responder, info, err, { ...limitHeaders, allow }, 405);
      } catch (err) {
        routes.sendError(responder, info, err, limitHeaders);
      }
    })();
  });
}

export function attachHttpRoutes(app: TemplatedApp, deps: TransportDeps): { closeStreams(): void } {
  const routes = createRoutes(app, deps);
  attachV1Routes(routes);
  attachTaskStream(routes);
  attachAiSdkRoutes(routes);
  attachOpenAIRoutes(routes);
  attachPreflight(routes);
  attachProbes(routes);
  for (const asset of staticAssets()) {
    app.get(asset.route, (res, req) => {
      const responder = new Responder(res);
      renderStaticRoute(responder, asset, req.getHeader('if-none-match'));
    });
  }
  attachFallback(routes);
  return {
    closeStreams() {
      for (const s of [...routes.streams]) s.end();
    },
  };
}
