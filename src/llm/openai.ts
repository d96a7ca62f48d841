import { setTimeout as sleep } from 'node:timers/promises';
import OpenAI, { APIConnectionError, APIConnectionTimeoutError, APIError, APIUserAbortError } from 'openai';
import type { ChatCompletionChunk, ChatCompletionCreateParamsStreaming } from 'openai/resources/chat/completions';
import { AppError } from '../protocol/index.js';
import { chunksOf, countTokens, type ModelRequest, type ModelResult, type Provider } from './provider.js';
import { createUpstreamHttp, SseReader } from './upstream-http.js';

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
// The SDK's own timeout would only cover the wait for response headers; ours (first token, idle) always fire first.
const SDK_TIMEOUT_MS = 3_600_000;
const PLACEHOLDER_API_KEY = 'chatwire-no-key';

/** A failure of one attempt, and whether a new attempt may help. */
interface Failure {
  error: AppError;
  retryable: boolean;
  /** The server refused `max_tokens` and wants `max_completion_tokens` (OpenAI's reasoning models). */
  wantsMaxCompletionTokens?: boolean;
  /** The server refused `stream_options` (some older compatible servers). */
  refusesStreamOptions?: boolean;
}

/** Retry-After as milliseconds: `retry-after-ms` (OpenAI's), else `retry-after` in seconds or as an HTTP date. */
export function retryAfterMsOf(headers: Headers | undefined, now = Date.now()): number | undefined {
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

/** The choice with index 0 (the one chatwire asks for), else the first: without a closure per chunk. */
function firstChoice(choices: ChatCompletionChunk['choices'] | undefined): ChatCompletionChunk['choices'][number] | undefined {
  if (!choices) return undefined;
  for (let i = 0; i < choices.length; i++) if ((choices[i] as ChatCompletionChunk['choices'][number]).index === 0) return choices[i];
  return choices[0];
}

function connectionCode(err: APIConnectionError): string {
  // undici: TypeError('fetch failed') caused by an Error with the errno code (ECONNREFUSED, ENOTFOUND, ...).
  let cause: unknown = err.cause;
  for (let i = 0; i < 4 && cause instanceof Error; i++) {
    const code = (cause as NodeJS.ErrnoException).code;
    if (typeof code === 'string') return code;
    cause = cause.cause;
  }
  return 'connection failed';
}

function httpFailure(err: APIError & { status: number }): Failure {
  const status = err.status;
  // Only the status goes into the message: upstream bodies can echo keys, prompts or account details.
  if (status === 429) {
    const retryAfterMs = retryAfterMsOf(err.headers);
    return {
      error: new AppError('upstream_error', 'the upstream is rate limiting chatwire (HTTP 429)', retryAfterMs === undefined ? {} : { retryAfterMs }),
      retryable: true,
    };
  }
  const hint = status === 401 || status === 403 ? ': check the API key' : status === 404 ? ': check the base URL and the model name' : '';
  return {
    error: new AppError('upstream_error', `the upstream answered HTTP ${status}${hint}`),
    retryable: status === 408 || status === 409 || status >= 500,
    wantsMaxCompletionTokens: status === 400 && (err.param === 'max_tokens' || /max_completion_tokens/.test(err.message)),
    refusesStreamOptions: status === 400 && (err.param === 'stream_options' || /stream_options/.test(err.message)),
  };
}

/**
 * The `openai` provider: streams chat completions from any OpenAI-compatible
 * server through the official SDK, with chatwire's own first-token and idle
 * timeouts and retries (the SDK's are turned off), and cancel aborting the
 * upstream request. See docs/providers.md for the exact rules.
 */
export function createOpenAIProvider(options: OpenAIProviderOptions): Provider {
  const upstream = createUpstreamHttp();
  const client = new OpenAI({
    baseURL: options.baseUrl,
    apiKey: options.apiKey ?? PLACEHOLDER_API_KEY,
    maxRetries: 0,
    timeout: SDK_TIMEOUT_MS,
    // Failures are reported as AppErrors by us; the SDK would also print malformed chunks to the console.
    logLevel: 'off',
    // Keep-alive connections and a body read without WHATWG streams: see upstream-http.ts.
    fetch: upstream.fetch,
  });
  const retryBaseDelayMs = options.retryBaseDelayMs ?? DEFAULT_RETRY_BASE_DELAY_MS;
  const checkTimeoutMs = options.checkTimeoutMs ?? DEFAULT_CHECK_TIMEOUT_MS;
  const drainAfterDoneMs = options.drainAfterDoneMs ?? DEFAULT_DRAIN_AFTER_DONE_MS;
  // Starts with max_tokens, which every compatible server knows; switches for good once the server asks for the other.
  let maxTokensParam: 'max_tokens' | 'max_completion_tokens' = 'max_tokens';
  // Asks for the usage chunk until a server refuses the option; its usage is counted from then on.
  let includeUsage = true;

  function bodyOf(request: ModelRequest): ChatCompletionCreateParamsStreaming {
    return {
      model: request.model,
      messages: request.messages.map((m) => ({ role: m.role, content: m.content })),
      stream: true,
      ...(includeUsage ? { stream_options: { include_usage: true } } : {}),
      ...(request.temperature === undefined ? {} : { temperature: request.temperature }),
      ...(request.maxTokens === undefined ? {} : { [maxTokensParam]: request.maxTokens }),
    };
  }

  function classify(err: unknown, phase: 'request' | 'stream'): Failure {
    if (err instanceof AppError) return { error: err, retryable: false };
    if (err instanceof APIUserAbortError) return { error: new AppError('upstream_error', 'the upstream request was aborted'), retryable: false };
    if (err instanceof APIConnectionTimeoutError) {
      return { error: new AppError('upstream_timeout', 'the upstream did not answer in time'), retryable: true };
    }
    if (err instanceof APIConnectionError) {
      return { error: new AppError('upstream_error', `cannot reach the upstream (${connectionCode(err)})`), retryable: true };
    }
    if (err instanceof APIError) {
      if (typeof err.status === 'number') return httpFailure(err as APIError & { status: number });
      // An `error` object sent as an SSE event (the SDK throws it as an APIError without status).
      return { error: new AppError('upstream_error', 'the upstream reported an error in the stream'), retryable: true };
    }
    if (err instanceof SyntaxError) {
      return { error: new AppError('upstream_error', 'the upstream sent malformed stream data (an SSE event that is not JSON)'), retryable: false };
    }
    if (phase === 'stream') {
      // undici's "terminated": the connection closed in the middle of the response body.
      return { error: new AppError('upstream_error', 'the upstream connection dropped mid-stream'), retryable: true };
    }
    return { error: new AppError('upstream_error', `the upstream request failed (${err instanceof Error ? err.name : 'unknown'})`), retryable: false };
  }

  async function streamTo(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult> {
    const deadline = Date.now() + options.firstTokenTimeoutMs;
    let text = '';
    const counted = (finishReason: ModelResult['finishReason']): ModelResult => ({
      finishReason,
      usage: {
        promptTokens: request.messages.reduce((sum, m) => sum + countTokens(m.content), 0),
        completionTokens: countTokens(text),
      },
      usageSource: 'counted',
    });

    for (let retries = 0; ; ) {
      const attempt = new AbortController();
      const onAbort = () => attempt.abort();
      signal.addEventListener('abort', onAbort, { once: true });
      if (signal.aborted) attempt.abort();
      let timedOut: 'first' | 'idle' | undefined;
      let timer = setTimeout(() => {
        timedOut = 'first';
        attempt.abort();
      }, Math.max(0, deadline - Date.now()));
      let phase: 'request' | 'stream' = 'request';
      let settled = false;
      let failure: Failure | undefined;
      try {
        // The SDK builds, authenticates and sends the request and maps HTTP failures; the SSE body is read here.
        const response = await client.chat.completions
          .create(bodyOf(request), { signal: attempt.signal, maxRetries: 0, timeout: SDK_TIMEOUT_MS })
          .asResponse();
        const body = upstream.bodyOf(response);
        if (!body) throw new AppError('internal', 'the upstream response has no readable body');
        phase = 'stream';
        const events = new SseReader(body);
        // Cancel and our timers end the reading at once; the loop then ends quietly, as the SDK's stream did.
        attempt.signal.addEventListener('abort', () => events.close(), { once: true });
        if (attempt.signal.aborted) events.close();
        let finishReason: string | undefined;
        let usage: ChatCompletionChunk['usage'];
        let sawDone = false;
        for (;;) {
          const event = events.read();
          if (event === undefined) {
            if (events.done) break;
            await events.wait();
            continue;
          }
          if (attempt.signal.aborted) break;
          // [DONE] ends the reply there and then: nothing after it counts (the SDK's rule too), and a server or proxy
          // that holds the response open after it must not turn a finished reply into an idle timeout.
          if (event.data.startsWith('[DONE]')) {
            sawDone = true;
            events.release(drainAfterDoneMs);
            break;
          }
          // `thread.*` events are the Assistants API's, not chat chunks.
          if (event.event !== null && event.event.startsWith('thread.')) continue;
          const chunk = JSON.parse(event.data) as (ChatCompletionChunk & { error?: unknown }) | null;
          if (typeof chunk !== 'object' || chunk === null) throw new SyntaxError('an SSE event that is not a JSON object');
          // An `error` object sent as an event: the APIError without a status that the SDK's stream throws.
          if (chunk.error) throw new APIError(undefined, chunk.error as object, undefined, response.headers);
          if (text.length > 0) timer.refresh();
          if (chunk.usage) usage = chunk.usage;
          const choice = firstChoice(chunk.choices);
          if (choice?.finish_reason) finishReason = choice.finish_reason;
          const content = choice?.delta?.content;
          if (typeof content !== 'string' || content.length === 0) continue;
          if (text.length === 0) {
            clearTimeout(timer);
            timer = setTimeout(() => {
              timedOut = 'idle';
              attempt.abort();
            }, options.idleTimeoutMs);
          }
          text += content;
          onChunk(content);
        }
        settled = true;
        // The reading ends quietly when the request is aborted: by cancel, or by one of our timers (handled below).
        if (timedOut === undefined) {
          if (signal.aborted) return counted('stop');
          if (finishReason === undefined && !sawDone) {
            // The body ended cleanly but before any finish_reason and before [DONE]: the reply is cut off.
            failure = { error: new AppError('upstream_error', 'the upstream stream ended before the reply was finished'), retryable: true };
          } else {
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
            return { ...counted(finish), ...extra };
          }
        }
      } catch (err) {
        failure = classify(err, phase);
      } finally {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        // Left on a failure (a malformed chunk, an error event): close the upstream request.
        if (!settled) attempt.abort();
      }

      if (timedOut === 'first') {
        throw new AppError('upstream_timeout', `the upstream sent no token within ${options.firstTokenTimeoutMs} ms`);
      }
      if (timedOut === 'idle') {
        throw new AppError('upstream_timeout', `the upstream stream stalled for ${options.idleTimeoutMs} ms`);
      }
      if (signal.aborted) return counted('stop');
      if (failure === undefined) throw new AppError('internal', 'the upstream attempt ended without a result');
      // These compatibility switches are made once per provider and are not retries.
      if (failure.wantsMaxCompletionTokens && maxTokensParam === 'max_tokens' && request.maxTokens !== undefined) {
        maxTokensParam = 'max_completion_tokens';
        continue;
      }
      if (failure.refusesStreamOptions && includeUsage) {
        includeUsage = false;
        continue;
      }
      if (text.length > 0 || !failure.retryable || retries >= options.maxRetries) throw failure.error;
      const backoff = Math.min(MAX_RETRY_DELAY_MS, retryBaseDelayMs * 2 ** retries) * (0.5 + Math.random() / 2);
      const wait = Math.max(backoff, failure.error.retryAfterMs ?? 0);
      // A retry that could not produce a token before the first-token deadline is not worth waiting for.
      if (Date.now() + wait >= deadline) throw failure.error;
      try {
        await sleep(wait, undefined, { signal });
      } catch {
        return counted('stop');
      }
      retries++;
    }
  }

  return {
    name: 'openai',
    streamTo,
    stream: (request, signal) => chunksOf((stop, onChunk) => streamTo(request, stop, onChunk), signal),

    async check() {
      try {
        await client.models.list({ maxRetries: 0, timeout: checkTimeoutMs });
      } catch (err) {
        if (err instanceof APIConnectionTimeoutError) {
          throw new Error(`the upstream at ${options.baseUrl} did not answer within ${checkTimeoutMs} ms`);
        }
        if (err instanceof APIConnectionError) {
          throw new Error(`cannot reach the upstream at ${options.baseUrl} (${connectionCode(err)})`);
        }
        if (err instanceof APIError && typeof err.status === 'number') {
          // Reachable, but without a model list (not every compatible server has one): chats may still work.
          if (err.status === 404 || err.status === 405) return;
          if (err.status === 401 || err.status === 403) {
            throw new Error(`the upstream at ${options.baseUrl} refused the API key (HTTP ${err.status})`);
          }
          throw new Error(`the upstream at ${options.baseUrl} answered HTTP ${err.status}`);
        }
        throw new Error(`the upstream at ${options.baseUrl} failed the readiness check (${err instanceof Error ? err.name : 'unknown'})`);
      }
    },
  };
}
