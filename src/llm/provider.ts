import type { FinishReason, Usage } from '../protocol/index.js';

export type ProviderName = 'dev' | 'openai' | 'local';

export interface ModelMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

/** One model call: everything that determines its output. Plain data: it crosses into the worker threads. */
export interface ModelRequest {
  model: string;
  messages: ModelMessage[];
  temperature?: number | undefined;
  maxTokens?: number | undefined;
}

export interface ModelResult {
  finishReason: Exclude<FinishReason, 'cancelled'>;
  usage: Usage;
  /** `reported` when the upstream sent usage, `counted` when chatwire counted it. */
  usageSource: 'reported' | 'counted';
  /**
   * Set when the reply is delivered but must not be cached: why, e.g. `finish_reason content_filter` (the
   * upstream ended it for a reason the protocol shows as `stop`, and which a later call may not repeat).
   */
  uncacheable?: string;
}

/**
 * A model provider: `stream(request, signal)` yields text chunks as the model
 * produces them and returns the usage. It must stop promptly when `signal`
 * aborts (returning what it has, or throwing an AbortError), and report
 * failures as AppError (`upstream_error`, `upstream_timeout`).
 */
export interface Provider {
  /** dev, openai, local, or a custom provider's name. */
  readonly name: string;
  stream(request: ModelRequest, signal: AbortSignal): AsyncGenerator<string, ModelResult, void>;
  /**
   * The same call with every chunk handed to `onChunk` as it arrives, where a provider has it: what the worker
   * uses then. A generator costs a few promise hops per chunk, which is most of a streamed token's cost in the worker.
   */
  streamTo?(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult>;
  /** Readiness: resolves when the provider can serve, rejects with the reason. */
  check?(): Promise<void>;
  close?(): Promise<void>;
}

/** Provider settings: plain data, passed to every worker thread as workerData. */
export interface ProviderSettings {
  llm: ProviderName;
  model: string;
  devTokenDelayMs: number;
  devFaults: boolean;
  openaiBaseUrl: string;
  openaiApiKey: string | undefined;
  upstreamFirstTokenTimeoutMs: number;
  upstreamIdleTimeoutMs: number;
  upstreamMaxRetries: number;
  modelPath: string | undefined;
  localThreads: number;
  localContextSize: number;
  localSequences: number;
  /** A custom provider module (createChatwire's `provider` option): its file URL and the plain data its factory gets. */
  module?: ProviderModule | undefined;
}

/** A provider module as the worker threads load it: `href` is a file: URL, `options` survives structuredClone. */
export interface ProviderModule {
  name: string;
  href: string;
  options: unknown;
}

export function providerSettingsFrom(config: ProviderSettings): ProviderSettings {
  return {
    llm: config.llm,
    model: config.model,
    devTokenDelayMs: config.devTokenDelayMs,
    devFaults: config.devFaults,
    openaiBaseUrl: config.openaiBaseUrl,
    openaiApiKey: config.openaiApiKey,
    upstreamFirstTokenTimeoutMs: config.upstreamFirstTokenTimeoutMs,
    upstreamIdleTimeoutMs: config.upstreamIdleTimeoutMs,
    upstreamMaxRetries: config.upstreamMaxRetries,
    modelPath: config.modelPath,
    localThreads: config.localThreads,
    localContextSize: config.localContextSize,
    localSequences: config.localSequences,
  };
}

/** Rough token count used where a provider cannot report one: words and punctuation runs. */
export function countTokens(text: string): number {
  const m = text.match(/[\p{L}\p{N}]+|[^\s\p{L}\p{N}]/gu);
  return m ? m.length : 0;
}

type Settled = { ok: true; result: ModelResult } | { ok: false; error: unknown };

/**
 * A provider's `stream` over its `streamTo`: yields the chunks `run` hands over, in order and each one
 * (including those that arrived before an abort), then returns its result or throws its error. A consumer that
 * stops iterating early stops the call.
 */
export async function* chunksOf(
  run: (signal: AbortSignal, onChunk: (text: string) => void) => Promise<ModelResult>,
  signal: AbortSignal,
): AsyncGenerator<string, ModelResult, void> {
  const stop = new AbortController();
  const onAbort = () => stop.abort();
  signal.addEventListener('abort', onAbort, { once: true });
  if (signal.aborted) stop.abort();
  const queue: string[] = [];
  let head = 0;
  let settled = null as Settled | null;
  let wake: (() => void) | null = null;
  const notify = () => {
    const resolve = wake;
    wake = null;
    resolve?.();
  };
  run(stop.signal, (text) => {
    queue.push(text);
    notify();
  }).then(
    (result) => {
      settled = { ok: true, result };
      notify();
    },
    (error: unknown) => {
      settled = { ok: false, error };
      notify();
    },
  );
  try {
    for (;;) {
      if (head < queue.length) {
        const text = queue[head++] as string;
        if (head === queue.length) {
          queue.length = 0;
          head = 0;
        }
        yield text;
        continue;
      }
      if (settled !== null) {
        if (settled.ok) return settled.result;
        throw settled.error;
      }
      await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    if (settled === null) stop.abort();
  }
}
