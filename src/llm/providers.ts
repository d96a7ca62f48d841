import { asProvider, isCustomProvider } from './custom-provider.js';
import { createDevProvider } from './dev.js';
import type { Provider, ProviderModule, ProviderSettings } from './provider.js';

/**
 * Builds the provider named by settings.llm. Runs inside each worker thread.
 * The real providers are imported on demand, so a worker running `dev` never
 * loads the openai client or llama.cpp.
 */
export async function createProvider(settings: ProviderSettings): Promise<Provider> {
  if (settings.module !== undefined) return loadProviderModule(settings.module);
  switch (settings.llm) {
    case 'dev':
      return createDevProvider({ tokenDelayMs: settings.devTokenDelayMs, faults: settings.devFaults });
    case 'openai': {
      const { createOpenAIProvider } = await import('./openai.js');
      return createOpenAIProvider({
        baseUrl: settings.openaiBaseUrl,
        apiKey: settings.openaiApiKey,
        firstTokenTimeoutMs: settings.upstreamFirstTokenTimeoutMs,
        idleTimeoutMs: settings.upstreamIdleTimeoutMs,
        maxRetries: settings.upstreamMaxRetries,
      });
    }
    case 'local': {
      const { createLocalProvider } = await import('./local.js');
      if (settings.modelPath === undefined) throw new Error('CHATWIRE_MODEL_PATH is not set: the local provider needs the path of a GGUF model file');
      return createLocalProvider({
        modelPath: settings.modelPath,
        threads: settings.localThreads,
        contextSize: settings.localContextSize,
        sequences: settings.localSequences,
      });
    }
  }
}

/**
 * A custom provider module: its default export is a factory, `(options) => Provider | Promise<Provider>`, called once
 * per worker thread with the `options` the host gave, or a Provider object itself.
 */
async function loadProviderModule(spec: ProviderModule): Promise<Provider> {
  const loaded = (await import(spec.href)) as { default?: unknown };
  const exported = loaded.default;
  const made: unknown = typeof exported === 'function' ? await (exported as (options: unknown) => unknown)(spec.options) : exported;
  if (!isCustomProvider(made)) {
    throw new Error(
      `provider module ${spec.href} does not export a provider: its default export must be a function returning { stream(request, signal) } or { streamTo(request, signal, onChunk) }, or such an object`,
    );
  }
  return asProvider({
    ...made,
    name: spec.name,
    stream: made.stream?.bind(made),
    streamTo: made.streamTo?.bind(made),
    check: made.check?.bind(made),
    close: made.close?.bind(made),
  });
}
