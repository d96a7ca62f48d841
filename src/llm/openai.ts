import { setTimeout as sleep } from 'node:timers/promises';
import type { ChatCompletionChunk, ChatCompletionCreateParamsStreaming } from 'openai/resources/chat/completions';
import { AppError } from '../protocol/index.js';
import { chunksOf, countTokens, type ModelRequest, type ModelResult, type Provider } from './provider.js';
import { createUpstreamHttp, SseParser, type ResponseHeaders } from './upstream-http.js';

export interface OpenAIProviderOptions {
  /** Base URL of any OpenAI-compatible server, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1. */
  baseUrl: string;
  /** Optional: local servers (Ollama, llama.cpp, LM Studio, vLLM) need none; a placeholder is sent then. */
  apiKey: string | undefined;
  /** Longest wait, from the call's start and across retries, for the first token. */
  firstTokenTimeoutMs: number;
  /** Longest silence between two chunks once tokens flow. */
  idleTimeoutMs: number;
  /** Retries before the first token; never after it, so a delta is never repeated or reordered. */
  maxRetries: number;
  /** The first retry waits about this long (with jitter), doubling each time; default 250 ms. */
  retryBaseDelayMs?: number;
  /** check()'s deadline for GET {base}/models; default 1500 ms, under the pool's 2 s readiness check. */
  checkTimeoutMs?: number;
  /** After `[DONE]`, how long the rest of the body may take to end before its connection is closed; default 2000 ms. */
  drainAfterDoneMs?: number;
}

const DEFAULT_RETRY_BASE_DELAY_MS = 250;
const MAX_RETRY_DELAY_MS = 8000;
const DEFAULT_CHECK_TIMEOUT_MS = 1500;
const DEFAULT_DRAIN_AFTER_DONE_MS = 2000;
const PLACEHOLDER_API_KEY = 'chatwire-no-key';
const INCLUDE_USAGE = { include_usage: true } as const;
// After `[DONE]`, how long the call waits for the body's end (which frees its keep-alive connection for the next
// call) before it ends without it.
const END_AFTER_DONE_MS = 2;
// An error body is read for its `error.param` and `error.message` (which compatibility switch the server wants); past
// this many characters the rest is not kept.
const MAX_ERROR_BODY_CHARS = 16_384;

/** A failure of one attempt, and whether a new attempt may help. */
interface Failure {
  error: AppError;
  retryable: boolean;
  /** The server refused `max_tokens` and wants `max_completion_tokens` (OpenAI's reasoning models). */
  wantsMaxCompletionTokens?: boolean;
  /** The server refused `stream_options` (some older compatible servers). */
  refusesStreamOptions?: boolean;
}

/** How one attempt ended. */
type AttemptEnd =
  | { kind: 'result'; result: ModelResult }
  | { kind: 'failure'; failure: Failure }
  | { kind: 'timeout'; which: 'first' | 'idle' }
  | { kind: 'cancelled' };

/** What a header lookup needs: a fetch Headers, or undici's parsed headers through headerGetter(). */
interface HeaderGetter {
  get(name: string): string | null | undefined;
}

function headerGetter(headers: ResponseHeaders): HeaderGetter {
  return {
    get(name) {
      const value = headers[name];
      return Array.isArray(value) ? value[0] : value;
    },
  };
}

/** Retry-After as milliseconds: `retry-after-ms` (OpenAI's), else `retry-after` in seconds or as an HTTP date. */
export function retryAfterMsOf(headers: HeaderGetter | undefined, now = Date.now()): number | undefined {
  const ms = headers?.get('retry-after-ms');
  if (ms && Number.isFinite(Number(ms)) && Number(ms) >= 0) return Math.ceil(Number(ms));
  const value = headers?.get('retry-after')?.trim();
  if (!value) return undefined;
  if (/^\d+(\.\d+)?$/.test(value)) return Math.ceil(Number(value) * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** A usage count as the protocol carries it (and SQLite stores it): a whole number >= 0. */
function isTokenCount(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

type Choice = ChatCompletionChunk['choices'][number];

/** The choice with index 0 (the one chatwire asks for), else the first: without a closure per chunk. */
function firstChoice(choices: ChatCompletionChunk['choices'] | undefined): Choice | undefined {
  if (!choices) return undefined;
  for (let i = 0; i < choices.length; i++) if ((choices[i] as Choice).index === 0) return choices[i];
  return choices[0];
}

/** The errno code (ECONNREFUSED, ENOTFOUND, ...) behind a failed connection, or a generic word. */
function connectionCode(err: unknown): string {
  let cause: unknown = err;
  for (let i = 0; i < 4 && cause instanceof Error; i++) {
    const code = (cause as NodeJS.ErrnoException).code;
    if (typeof code === 'string' && !code.startsWith('UND_ERR')) return code;
    cause = cause.cause;
  }
  return 'connection failed';
}

/** An error object's `param` and `message`, from an OpenAI-shaped error body (`{"error": {...}}`), if it is one. */
function errorDetails(body: string): { param: unknown; message: string } {
  try {
    const parsed = JSON.parse(body) as { error?: { param?: unknown; message?: unknown } } | null;
    const error = parsed?.error;
    return { param: error?.param, message: typeof error?.message === 'string' ? error.message : '' };
  } catch {
    return { param: undefined, message: body };
  }
}

function httpFailure(status: number, headers: ResponseHeaders, body: string): Failure {
  // Only the status goes into the message: upstream bodies can echo keys, prompts or account details.
  if (status === 429) {
    const retryAfterMs = retryAfterMsOf(headerGetter(headers));
    return {
      error: new AppError('upstream_error', 'the upstream is rate limiting chatwire (HTTP 429)', retryAfterMs === undefined ? {} : { retryAfterMs }),
      retryable: true,
    };
  }
  const hint = status === 401 || status === 403 ? ': check the API key' : status === 404 ? ': check the base URL and the model name' : '';
  const details = status === 400 ? errorDetails(body) : { param: undefined, message: '' };
  return {
    error: new AppError('upstream_error', `the upstream answered HTTP ${status}${hint}`),
    retryable: status === 408 || status === 409 || status >= 500,
    wantsMaxCompletionTokens: status === 400 && (details.param === 'max_tokens' || /max_completion_tokens/.test(details.message)),
    refusesStreamOptions: status === 400 && (details.param === 'stream_options' || /stream_options/.test(details.message)),
  };
}

/** Thrown by the event handler for an `error` object sent as an SSE event. */
class StreamErrorEvent extends Error {}

function classify(err: unknown, phase: 'request' | 'stream'): Failure {
  if (err instanceof AppError) return { error: err, retryable: false };
  if (err instanceof StreamErrorEvent) return { error: new AppError('upstream_error', 'the upstream reported an error in the stream'), retryable: true };
  if (err instanceof SyntaxError) {
    return { error: new AppError('upstream_error', 'the upstream sent malformed stream data (an SSE event that is not JSON)'), retryable: false };
  }
  if (phase === 'stream') {
    // The connection closed in the middle of the response body.
    return { error: new AppError('upstream_error', 'the upstream connection dropped mid-stream'), retryable: true };
  }
  return { error: new AppError('upstream_error', `cannot reach the upstream (${connectionCode(err)})`), retryable: true };
}

/**
 * The `openai` provider: streams chat completions from any OpenAI-compatible server over undici's pooled client
 * (keep-alive per origin, see upstream-http.ts), parsing the event stream as its bytes arrive, with chatwire's own
 * first-token and idle timeouts and retries before the first token, and cancel closing the upstream request. The
 * `openai` package gives the wire types only: its client would put its request building and three async
 * generators on every call and every token. See docs/providers.md for the exact rules.
 */
export function createOpenAIProvider(options: OpenAIProviderOptions): Provider {
  const upstream = createUpstreamHttp(options.baseUrl);
  const authorization = `Bearer ${options.apiKey ?? PLACEHOLDER_API_KEY}`;
  const retryBaseDelayMs = options.retryBaseDelayMs ?? DEFAULT_RETRY_BASE_DELAY_MS;
  const checkTimeoutMs = options.checkTimeoutMs ?? DEFAULT_CHECK_TIMEOUT_MS;
  const drainAfterDoneMs = options.drainAfterDoneMs ?? DEFAULT_DRAIN_AFTER_DONE_MS;
  // Starts with max_tokens, which every compatible server knows; switches for good once the server asks for the other.
  let maxTokensParam: 'max_tokens' | 'max_completion_tokens' = 'max_tokens';
  // Asks for the usage chunk until a server refuses the option; its usage is counted from then on.
  let includeUsage = true;

  /** The request's JSON body, built field by field (no spread of temporary objects: it is on the way to the first token). */
  function bodyOf(request: ModelRequest): string {
    const messages: ChatCompletionCreateParamsStreaming['messages'] = new Array(request.messages.length);
    for (let i = 0; i < request.messages.length; i++) {
      const m = request.messages[i] as ModelRequest['messages'][number];
      messages[i] = { role: m.role, content: m.content };
    }
    const body: ChatCompletionCreateParamsStreaming = { model: request.model, messages, stream: true };
    if (includeUsage) body.stream_options = INCLUDE_USAGE;
    if (request.temperature !== undefined) body.temperature = request.temperature;
    if (request.maxTokens !== undefined) body[maxTokensParam] = request.maxTokens;
    return JSON.stringify(body);
  }

  /** What one call has streamed so far, across its attempts (only the first attempt to stream a token may have any). */
  interface CallState {
    text: string;
  }

  /**
   * One request to the upstream, read to its end: each content delta goes to `onChunk` in the callback that parsed
   * it. Resolves (never rejects) with how it ended; the request is closed on every end but a clean one. The request
   * is sent first; the first-token timer and the parser are set up after it (nothing of the response can arrive
   * before this turn ends), so that they do not hold the request up.
   */
  function attempt(request: ModelRequest, signal: AbortSignal, deadline: number, call: CallState, onChunk: (text: string) => void): Promise<AttemptEnd> {
    return new Promise((resolve) => {
      let finished = false;
      let responseEnded = false;
      let drainTimer: NodeJS.Timeout | undefined;
      let status = 0;
      let responseHeaders: ResponseHeaders = {};
      let errorBody = '';
      let finishReason: string | undefined;
      let usage: ChatCompletionChunk['usage'];
      let sawDone = false;
      let streaming = false;
      // Set once the request is handed to undici, right below.
      let abort: (reason: Error) => void = () => {};
      // Set once the request is sent (the first-token timer) and once its body starts (the parser).
      let timer: NodeJS.Timeout | undefined;
      let parser: SseParser | undefined;
      const finish = (end: AttemptEnd, closeRequest: boolean) => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        parser?.stop();
        if (closeRequest) abort(new Error('chatwire closed the upstream request'));
        resolve(end);
      };
      const onAbort = () => finish({ kind: 'cancelled' }, true);

      const completed = () => {
        // The body ended cleanly but before any finish_reason and before [DONE]: the reply is cut off.
        if (finishReason === undefined && !sawDone) {
          finish(
            { kind: 'failure', failure: { error: new AppError('upstream_error', 'the upstream stream ended before the reply was finished'), retryable: true } },
            false,
          );
          return;
        }
        finish({ kind: 'result', result: resultOf(request, call.text, finishReason, usage) }, false);
      };
      const onEvent = (event: string | null, data: string) => {
        // [DONE] ends the reply there and then: nothing after it counts, and a server or proxy that holds the response
        // open after it must not turn a finished reply into an idle timeout. The body is left to end on its own so its
        // keep-alive connection serves the next call; one that has not ended within drainAfterDoneMs is closed.
        if (data.startsWith('[DONE]')) {
          sawDone = true;
          parser?.stop();
          clearTimeout(timer);
          if (responseEnded) {
            completed();
            return;
          }
          drainTimer = setTimeout(() => abort(new Error('the upstream held its response open after [DONE]')), drainAfterDoneMs);
          drainTimer.unref();
          // The body's end usually follows [DONE] at once: the call ends with it (or in the same read), so its
          // connection is free again for the next call; a body held open ends the call after END_AFTER_DONE_MS.
          queueMicrotask(() => {
            if (responseEnded || finished) return;
            timer = setTimeout(completed, END_AFTER_DONE_MS);
          });
          return;
        }
        // `thread.*` events are the Assistants API's, not chat chunks.
        if (event?.startsWith('thread.')) return;
        const chunk = JSON.parse(data) as (ChatCompletionChunk & { error?: unknown }) | null;
        if (typeof chunk !== 'object' || chunk === null) throw new SyntaxError('an SSE event that is not a JSON object');
        if (chunk.error) throw new StreamErrorEvent('an error event');
        if (streaming) timer?.refresh();
        if (chunk.usage) usage = chunk.usage;
        const choice = firstChoice(chunk.choices);
        if (choice?.finish_reason) finishReason = choice.finish_reason;
        const content = choice?.delta?.content;
        if (typeof content !== 'string' || content.length === 0) return;
        if (!streaming) {
          streaming = true;
          clearTimeout(timer);
          timer = setTimeout(() => finish({ kind: 'timeout', which: 'idle' }, true), options.idleTimeoutMs);
        }
        call.text += content;
        onChunk(content);
      };
      const onSse = (event: string | null, data: string) => {
        if (finished) return;
        try {
          onEvent(event, data);
        } catch (err) {
          // A malformed chunk or an error event: the request is closed.
          finish({ kind: 'failure', failure: classify(err, 'stream') }, true);
        }
      };
      abort = upstream.send(
        {
          method: 'POST',
          path: '/chat/completions',
          headers: { authorization, 'content-type': 'application/json', accept: 'text/event-stream' },
          body: bodyOf(request),
        },
        {
          head(s, h) {
            status = s;
            responseHeaders = h;
          },
          data(chunk) {
            if (finished) return;
            if (status >= 200 && status < 300) {
              parser ??= new SseParser(onSse);
              parser.write(chunk);
            } else if (errorBody.length < MAX_ERROR_BODY_CHARS) errorBody += chunk.toString('utf8');
          },
          end() {
            responseEnded = true;
            clearTimeout(drainTimer);
            if (finished) return;
            if (status >= 200 && status < 300) {
              parser?.end();
              completed();
            } else {
              finish({ kind: 'failure', failure: httpFailure(status, responseHeaders, errorBody) }, false);
            }
          },
          error(err) {
            responseEnded = true;
            clearTimeout(drainTimer);
            finish({ kind: 'failure', failure: classify(err, status === 0 ? 'request' : 'stream') }, false);
          },
        },
      );
      // The request failed as it was handed over (the attempt is over), or it is on its way.
      if (finished) return;
      timer = setTimeout(() => finish({ kind: 'timeout', which: 'first' }, true), Math.max(0, deadline - Date.now()));
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  function resultOf(request: ModelRequest, text: string, finishReason: string | undefined, usage: ChatCompletionChunk['usage']): ModelResult {
    const finish: ModelResult['finishReason'] = finishReason === 'length' ? 'length' : 'stop';
    // The protocol has no word for content_filter, tool_calls or a server's own reasons: they go out as
    // `stop`, but are not cached (a filtered or tool-call reply must not be replayed for the whole TTL).
    const extra = finishReason === undefined || finishReason === 'stop' || finishReason === 'length' ? {} : { uncacheable: `finish_reason ${finishReason}` };
    if (usage && isTokenCount(usage.prompt_tokens) && isTokenCount(usage.completion_tokens)) {
      return {
        finishReason: finish,
        usage: { promptTokens: usage.prompt_tokens, completionTokens: usage.completion_tokens },
        usageSource: 'reported',
        ...extra,
      };
    }
    return { ...counted(request, text, finish), ...extra };
  }

  function counted(request: ModelRequest, text: string, finishReason: ModelResult['finishReason']): ModelResult {
    return {
      finishReason,
      usage: { promptTokens: request.messages.reduce((sum, m) => sum + countTokens(m.content), 0), completionTokens: countTokens(text) },
      usageSource: 'counted',
    };
  }

  async function streamTo(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult> {
    const deadline = Date.now() + options.firstTokenTimeoutMs;
    const call: CallState = { text: '' };
    for (let retries = 0; ; ) {
      const end = await attempt(request, signal, deadline, call, onChunk);
      if (end.kind === 'result') return end.result;
      if (end.kind === 'cancelled') return counted(request, call.text, 'stop');
      if (end.kind === 'timeout') {
        throw end.which === 'first'
          ? new AppError('upstream_timeout', `the upstream sent no token within ${options.firstTokenTimeoutMs} ms`)
          : new AppError('upstream_timeout', `the upstream stream stalled for ${options.idleTimeoutMs} ms`);
      }
      const failure = end.failure;
      // These compatibility switches are made once per provider and are not retries.
      if (failure.wantsMaxCompletionTokens && maxTokensParam === 'max_tokens' && request.maxTokens !== undefined) {
        maxTokensParam = 'max_completion_tokens';
        continue;
      }
      if (failure.refusesStreamOptions && includeUsage) {
        includeUsage = false;
        continue;
      }
      if (call.text.length > 0 || !failure.retryable || retries >= options.maxRetries) throw failure.error;
      const backoff = Math.min(MAX_RETRY_DELAY_MS, retryBaseDelayMs * 2 ** retries) * (0.5 + Math.random() / 2);
      const wait = Math.max(backoff, failure.error.retryAfterMs ?? 0);
      // A retry that could not produce a token before the first-token deadline is not worth waiting for.
      if (Date.now() + wait >= deadline) throw failure.error;
      try {
        await sleep(wait, undefined, { signal });
      } catch {
        return counted(request, call.text, 'stop');
      }
      retries++;
    }
  }

  /** GET {base}/models within checkTimeoutMs: its status, or why there is none. */
  function probe(): Promise<{ status: number } | { error: 'timeout' } | { error: 'connection'; cause: unknown }> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        // Resolved first: the abort reports itself to the sink as an error, which must not pass for a refused connection.
        resolve({ error: 'timeout' });
        abort(new Error('readiness check timed out'));
      }, checkTimeoutMs);
      let status = 0;
      const abort = upstream.send(
        { method: 'GET', path: '/models', headers: { authorization, accept: 'application/json' } },
        {
          head: (s) => {
            status = s;
          },
          data() {},
          // The body is read to its end so that the connection stays open for the first chat (the pool's warm-up).
          end() {
            clearTimeout(timer);
            resolve({ status });
          },
          error(err) {
            clearTimeout(timer);
            resolve(status === 0 ? { error: 'connection', cause: err } : { status });
          },
        },
      );
    });
  }

  return {
    name: 'openai',
    streamTo,
    stream: (request, signal) => chunksOf((stop, onChunk) => streamTo(request, stop, onChunk), signal),

    async check() {
      const answer = await probe();
      if ('error' in answer) {
        if (answer.error === 'timeout') throw new Error(`the upstream at ${options.baseUrl} did not answer within ${checkTimeoutMs} ms`);
        throw new Error(`cannot reach the upstream at ${options.baseUrl} (${connectionCode(answer.cause)})`);
      }
      const status = answer.status;
      if (status >= 200 && status < 300) return;
      // Reachable, but without a model list (not every compatible server has one): chats may still work.
      if (status === 404 || status === 405) return;
      if (status === 401 || status === 403) throw new Error(`the upstream at ${options.baseUrl} refused the API key (HTTP ${status})`);
      throw new Error(`the upstream at ${options.baseUrl} answered HTTP ${status}`);
    },
  };
}
