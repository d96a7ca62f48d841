/**
 * The OpenAI-compatible API (PROTOCOL.md, "OpenAI-compatible API"): `GET /v1/models` and `POST /v1/chat/completions`,
 * what the official OpenAI clients speak. A completion is a chatwire task like any other, sent through the same chat
 * service (buckets, reply cache, single-flight, storage); only its wire format is OpenAI's.
 */
import type { HttpResponse } from 'uWebSockets.js';
import type { Identity } from '../auth/identity.js';
import type { ReplySource, SendResult } from '../chat/chat-service.js';
import type { Sink, TaskTerminal } from '../chat/task.js';
import {
  AppError,
  CacheModeSchema,
  ChatSendFields,
  ClientMessageIdSchema,
  messageText,
  OpenAIAppError,
  OpenAIChatRequestSchema,
  openAIBadRequest,
  openAIErrorBody,
  toAppError,
  type ChatDone,
  type ChatSendBody,
  type FrameBounds,
  type OpenAIChatChunk,
  type OpenAIChatCompletion,
  type OpenAIModelList,
} from '../protocol/index.js';
import { takeUserSlot } from './connection.js';
import { captureRequest, parseJsonBody, readBody, Responder, type RequestInfo } from './http-io.js';
import type { Routes } from './http-routes.js';
import { REPLAYED_HEADER } from './idempotency-key.js';
import { TaskEventStream, type SseEncoding } from './task-event-stream.js';

/** RFC 9211 Cache-Status of each way a reply is produced. */
const CACHE_STATUS: Record<ReplySource, string> = {
  cache: 'chatwire; hit',
  model: 'chatwire; fwd=miss',
  joined: 'chatwire; fwd=miss; collapsed',
};

// The fields chatwire reads are at most 5 deep (body, messages, message, content, part); the ignored ones OpenAI
// defines (metadata, prediction, ...) are shallow too. A body nested deeper is refused before it is decoded.
const BODY_BOUNDS: FrameBounds = { depth: 32, values: Number.MAX_SAFE_INTEGER };

/** What a completion request asks the chat service for, and how the answer is written. */
interface Completion {
  body: Omit<ChatSendBody, 'id'>;
  context: { role: 'system' | 'user' | 'assistant'; content: string }[];
  stream: boolean;
  includeUsage: boolean;
}

/** The fields every chunk and completion of one reply share. */
interface ReplyIds {
  id: string;
  created: number;
  model: string;
}

/** An OpenAI error answer: the catalogue's status, the OpenAI body, Retry-After and retry-after-ms on a 429. */
function sendError(routes: Routes, responder: Responder, info: RequestInfo, err: unknown, extra: Record<string, string>, counted = false): void {
  const { deps } = routes;
  const e = toAppError(err);
  if (!counted) {
    if (e.code === 'internal') deps.log.error({ err: e.cause ?? e, url: info.url }, 'http request failed');
    deps.metrics.errors.inc({ code: e.code });
  }
  const headers: Record<string, string> = {
    ...routes.commonHeaders(info),
    ...extra,
    'content-type': 'application/json',
    'cache-control': 'no-store',
    // The official clients retry what this says (else by status): a 500 `internal` is not worth a second chat.
    'x-should-retry': String(e.retryable),
  };
  if (e.retryAfterMs !== undefined) {
    headers['retry-after'] = String(Math.max(1, Math.ceil(e.retryAfterMs / 1000)));
    headers['retry-after-ms'] = String(Math.max(1, Math.ceil(e.retryAfterMs)));
  }
  if (e.status === 401) headers['www-authenticate'] = 'Bearer';
  responder.send(e.status, headers, JSON.stringify(openAIErrorBody(e)), deps.admission.closesConnection(e));
}

/** The open-mode user id of a decoded body (its `user` field), read before the body is validated. */
function bodyUser(decoded: { ok: true; value: unknown } | { ok: false; error: unknown }): string | undefined {
  if (!decoded.ok || typeof decoded.value !== 'object' || decoded.value === null) return undefined;
  const user = (decoded.value as { user?: unknown }).user;
  return typeof user === 'string' && user !== '' ? user : undefined;
}

/** A chatwire request header, validated by `schema`; a bad value is a 400 naming the header. */
function headerValue<T>(info: RequestInfo, name: string, schema: { safeParse(v: unknown): { success: true; data: T } | { success: false } }): T | undefined {
  const raw = info.headers.get(name);
  if (raw === undefined || raw === '') return undefined;
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw new OpenAIAppError('bad_request', `${name}: invalid value`, { param: name });
  return parsed.data;
}

/** Validates a completion request and maps it onto a chat: the last message is its text, the others its whole context. */
function completionOf(raw: unknown, info: RequestInfo, servedModel: string): Completion {
  const parsed = OpenAIChatRequestSchema.safeParse(raw);
  if (!parsed.success) throw openAIBadRequest(parsed.error);
  const req = parsed.data;
  if (req.model !== servedModel) {
    throw new OpenAIAppError('not_found', `the model ${req.model.slice(0, 128)} does not exist; GET /v1/models lists the one served here`, {
      param: 'model',
      code: 'model_not_found',
    });
  }
  const conversationId = headerValue(info, 'x-chatwire-conversation-id', ChatSendFields.conversationId.unwrap());
  const cache = headerValue(info, 'x-chatwire-cache', CacheModeSchema);
  const clientMessageId = headerValue(info, 'idempotency-key', ClientMessageIdSchema);
  const last = req.messages.at(-1) as (typeof req.messages)[number];
  const maxTokens = req.max_completion_tokens ?? req.max_tokens ?? undefined;
  const params = { ...(req.temperature != null ? { temperature: req.temperature } : {}), ...(maxTokens !== undefined ? { maxTokens } : {}) };
  return {
    body: { text: messageText(last), conversationId, cache, params, ...(clientMessageId === undefined ? {} : { clientMessageId }) },
    context: req.messages.slice(0, -1).map((m) => ({ role: m.role === 'developer' ? 'system' : m.role, content: messageText(m) })),
    stream: req.stream === true,
    includeUsage: req.stream === true && req.stream_options?.include_usage === true,
  };
}

const usageOf = (u: ChatDone['usage']) => ({
  prompt_tokens: u.promptTokens,
  completion_tokens: u.completionTokens,
  total_tokens: u.promptTokens + u.completionTokens,
});

/** OpenAI knows stop and length; a task cancelled elsewhere (chat.cancel, shutdown) ends as a stop with its text so far. */
const finishReasonOf = (done: ChatDone) => (done.finishReason === 'length' ? 'length' : 'stop');

/**
 * The chunks of a streamed completion, as the task stream's format: one chunk per delta (the first with the role),
 * then a chunk with the finish reason, the usage chunk when asked for, and `[DONE]`; a failure is one error event.
 */
function chunkFormat(ids: ReplyIds, includeUsage: boolean, onEnd: () => void): SseEncoding {
  let roleSent = false;
  const chunk = (choices: OpenAIChatChunk['choices'], usage: OpenAIChatChunk['usage'] = null): string => {
    const c: OpenAIChatChunk = { id: ids.id, object: 'chat.completion.chunk', created: ids.created, model: ids.model, choices };
    if (includeUsage) c.usage = usage;
    return `data: ${JSON.stringify(c)}\n\n`;
  };
  const events = (m: Parameters<SseEncoding['events']>[0]): string => {
    if (m.type === 'chat.delta') {
      const delta = roleSent ? { content: m.text } : { role: 'assistant' as const, content: m.text };
      roleSent = true;
      return chunk([{ index: 0, delta, finish_reason: null }]);
    }
    onEnd();
    if (m.type === 'chat.error') return `data: ${JSON.stringify(openAIErrorBody(new AppError(m.code, m.message)))}\n\n`;
    let out = chunk([{ index: 0, delta: roleSent ? {} : { role: 'assistant' }, finish_reason: finishReasonOf(m) }]);
    if (includeUsage) out += chunk([], usageOf(m.usage));
    return `${out}data: [DONE]\n\n`;
  };
  return { opening: '', events };
}

/** One completion request answered: the chat sent, then its reply streamed or returned whole. */
class CompletionExchange {
  private ended = false;

  constructor(
    private readonly routes: Routes,
    private readonly res: HttpResponse,
    private readonly responder: Responder,
    private readonly info: RequestInfo,
    private readonly caller: Identity,
  ) {}

  async run(completion: Completion, receivedAt: number): Promise<void> {
    const { deps } = this.routes;
    // A stream holds one of the user's connection slots, as /v1/tasks/:taskId/stream does; a request waiting for the
    // whole reply is bounded by the user's chats in flight (CHATWIRE_MAX_RUNNING_PER_USER) instead.
    const release = completion.stream ? await takeUserSlot(deps, this.caller.userId) : () => {};
    let sent: SendResult;
    try {
      sent = await deps.chat.send(this.caller, completion.body, receivedAt, { context: completion.context });
    } catch (err) {
      release();
      throw err;
    }
    const taskId = sent.ack.taskId;
    // The client closing the connection before the end cancels the task (a model call it shares goes on for the others).
    this.responder.onAbort(() => this.cancel(taskId));
    if (!this.responder.open) {
      release();
      await this.cancel(taskId);
      return;
    }
    // `created` is the task's: a repeated Idempotency-Key gets the first answer's body, byte for byte.
    const createdMs = sent.duplicate ? Date.parse((await deps.chat.task(this.caller, taskId)).createdAt) : sent.task.createdAt;
    const ids: ReplyIds = { id: `chatcmpl-${taskId}`, created: Math.floor(createdMs / 1000), model: deps.config.model };
    const headers: Record<string, string> = {
      'x-request-id': taskId,
      'cache-status': CACHE_STATUS[sent.source],
      'x-chatwire-conversation-id': sent.ack.conversationId,
    };
    // A repeated Idempotency-Key: the first request's task, its reply whole or streamed from its start.
    if (sent.duplicate) headers[REPLAYED_HEADER] = 'true';
    if (completion.stream) await this.stream(taskId, ids, headers, completion.includeUsage, release);
    else await this.whole(taskId, ids, headers);
  }

  private async cancel(taskId: string): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    try {
      await this.routes.deps.chat.cancel(this.caller, taskId);
    } catch (err) {
      this.routes.deps.log.warn({ err, taskId, userId: this.caller.userId }, 'cancelling the task of a closed completion request failed');
    }
  }

  private async stream(taskId: string, ids: ReplyIds, headers: Record<string, string>, includeUsage: boolean, release: () => void): Promise<void> {
    const { deps } = this.routes;
    const format = chunkFormat(ids, includeUsage, () => (this.ended = true));
    const stream = new TaskEventStream(this.res, this.responder, this.routes.streams, release, format);
    // The chat's own reply from its start, as chat.send streams it: not a replay, so not charged to egress.
    await stream.subscribe(deps.chat, this.caller, taskId, 0, () => {});
    if (!this.responder.open) {
      stream.end();
      return;
    }
    stream.start({
      ...this.routes.commonHeaders(this.info),
      ...deps.rateLimitHeaders(this.caller.userId),
      ...headers,
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-store',
      'x-accel-buffering': 'no',
    });
  }

  private async whole(taskId: string, ids: ReplyIds, headers: Record<string, string>): Promise<void> {
    const { deps } = this.routes;
    const texts: string[] = [];
    let settle: (end: TaskTerminal | null) => void = () => {};
    const settled = new Promise<TaskTerminal | null>((resolve) => (settle = resolve));
    const sink: Sink = {
      congested: () => false,
      deliver: (m) => {
        if (m.type === 'chat.delta') texts.push(m.text);
        else if (m.type === 'chat.done' || m.type === 'chat.error') {
          this.ended = true;
          settle(m);
        }
        return true;
      },
    };
    this.responder.onAbort(() => settle(null));
    const subscription = await deps.chat.subscribe(this.caller, taskId, 0, sink);
    subscription.pump();
    const end = await settled;
    subscription.close();
    if (end === null || !this.responder.open) return;
    const extra = { ...deps.rateLimitHeaders(this.caller.userId), ...headers };
    if (end.type === 'chat.error') {
      // Counted and logged by the chat service when the task failed.
      sendError(this.routes, this.responder, this.info, new AppError(end.code, end.message), extra, true);
      return;
    }
    const body: OpenAIChatCompletion = {
      id: ids.id,
      object: 'chat.completion',
      created: ids.created,
      model: ids.model,
      choices: [{ index: 0, message: { role: 'assistant', content: texts.join('') }, finish_reason: finishReasonOf(end) }],
      usage: usageOf(end.usage),
    };
    this.responder.send(
      200,
      { ...this.routes.commonHeaders(this.info), ...extra, 'content-type': 'application/json', 'cache-control': 'no-store' },
      JSON.stringify(body),
    );
  }
}

/** GET /v1/models: the one model chatwire serves. */
function attachModels(routes: Routes, created: number): void {
  const { deps } = routes;
  routes.v1Routes.push({ method: 'GET', pattern: '/v1/models' });
  routes.app.get('/v1/models', (res, req) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res);
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        await routes.admit(info, (h) => (limitHeaders = h));
        const list: OpenAIModelList = { object: 'list', data: [{ id: deps.config.model, object: 'model', created, owned_by: 'chatwire' }] };
        const headers = { ...routes.commonHeaders(info), ...limitHeaders, 'content-type': 'application/json', 'cache-control': 'private, max-age=300' };
        responder.send(200, headers, JSON.stringify(list));
      } catch (err) {
        sendError(routes, responder, info, err, limitHeaders);
      }
    })();
  });
}

/** POST /v1/chat/completions. */
function attachCompletions(routes: Routes): void {
  const { deps } = routes;
  routes.v1Routes.push({ method: 'POST', pattern: '/v1/chat/completions' });
  routes.app.post('/v1/chat/completions', (res, req) => {
    const receivedAt = performance.now();
    const responder = new Responder(res);
    const info = captureRequest(req, res);
    // Read now: uWS hands body chunks only to an onData registered before this callback returns (see v1Route).
    const requestBody = readBody(responder, deps.config.maxFrameBytes);
    requestBody.catch(() => {});
    const decode = () =>
      requestBody.then(
        (body) => {
          try {
            return { ok: true as const, value: parseJsonBody(body, BODY_BOUNDS) };
          } catch (error) {
            return { ok: false as const, error };
          }
        },
        (error: unknown) => ({ ok: false as const, error }),
      );
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        // Open mode takes the user from the body's `user` field, so the body is decoded first; with tokens, after.
        const early = deps.auth.mode === 'open' ? await decode() : null;
        const caller = await routes.admit(info, (h) => (limitHeaders = h), early === null ? undefined : bodyUser(early));
        const contentType = info.headers.get('content-type') ?? '';
        if (contentType && !/^application\/json\b/i.test(contentType)) throw new AppError('bad_request', 'the body must be application/json');
        const decoded = early ?? (await decode());
        if (!decoded.ok) throw decoded.error;
        const completion = completionOf(decoded.value, info, deps.config.model);
        await new CompletionExchange(routes, res, responder, info, caller).run(completion, receivedAt);
      } catch (err) {
        sendError(routes, responder, info, err, limitHeaders);
      }
    })();
  });
}

/** Registers the OpenAI-compatible routes. */
export function attachOpenAIRoutes(routes: Routes): void {
  attachModels(routes, Math.floor(Date.now() / 1000));
  attachCompletions(routes);
}
