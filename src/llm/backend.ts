import type { ProviderSettings } from './provider.js';

/**
 * The backend fingerprint: what, besides the request itself, decides a
 * provider's reply. It is part of the cache key (docs/cache.md), so that a
 * reply is never served after the server starts against another upstream or
 * model file. Computed once at start; never holds a secret.
 *
 * - `dev`: empty. Its reply is a pure function of the request (model name,
 *   params, messages); its token delay and fault switch change no text.
 * - `openai`: the base URL, normalized (upstreamIdentity). Not the API key:
 *   it picks an account, not a model, and must never be kept anywhere.
 * - `local`: the model file's identity (validateLocalModel) and the context
 *   size, which cuts long prompts and replies.
 */
export function backendFingerprint(settings: Pick<ProviderSettings, 'llm' | 'openaiBaseUrl' | 'localContextSize'>, localModel?: { identity: string }): string {
  switch (settings.llm) {
    case 'dev':
      return '';
    case 'openai':
      return upstreamIdentity(settings.openaiBaseUrl);
    case 'local':
      if (localModel === undefined) throw new Error('the local backend fingerprint needs the validated model file');
      return `${localModel.identity} context=${settings.localContextSize}`;
  }
}

/**
 * The base URL as the upstream it names: scheme, host and port as URL parsing
 * normalizes them (lower case, default port dropped), the path with one
 * trailing slash dropped (the openai package joins `/v1` and `/v1/` alike), the
 * query kept. User name, password and fragment are dropped: they never select
 * another server, and a password must not reach the key.
 */
export function upstreamIdentity(baseUrl: string): string {
  const url = new URL(baseUrl);
  return `${url.protocol}//${url.host}${url.pathname.replace(/\/$/, '')}${url.search}`;
}
