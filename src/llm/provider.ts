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
}

/**
 * A model provider: `stream(request, signal)` yields text chunks as the model
 * produces them and returns the usage. It must stop promptly when `signal`
 * aborts (returning what it has, or throwing an AbortError), and report
 * failures as AppError (`upstream_error`, `upstream_timeout`).
 */
export interface Provider {
  readonly name: ProviderName;
  stream(request: ModelRequest, signal: AbortSignal): AsyncGenerator<string, ModelResult, void>;
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
