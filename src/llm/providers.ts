import { createDevProvider } from './dev.js';
import type { Provider, ProviderSettings } from './provider.js';

/**
 * Builds the provider named by settings.llm. Runs inside each worker thread.
 * The real providers are imported on demand, so a worker running `dev` never
 * loads the openai client or llama.cpp.
 */
export async function createProvider(settings: ProviderSettings): Promise<Provider> {
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
