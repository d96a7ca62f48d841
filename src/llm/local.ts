import { setTimeout as sleep } from 'node:timers/promises';
import {
  getLlama,
  LlamaChat,
  LlamaLogLevel,
  type ChatHistoryItem,
  type Llama,
  type LlamaContext,
  type LlamaContextSequence,
  type LlamaModel,
} from 'node-llama-cpp';
import { AppError } from '../protocol/index.js';
import { validateLocalModel } from './local-model.js';
import type { ModelMessage, ModelRequest, ModelResult, Provider } from './provider.js';

/** Generations one worker runs at once (one context sequence each, evaluated in shared batches); more wait their turn. */
export const LOCAL_DEFAULT_SEQUENCES = 4;
/** Sampling temperature when the request sets none (node-llama-cpp's suggested value; 0 would be greedy). */
export const LOCAL_DEFAULT_TEMPERATURE = 0.8;
const CLOSE_RELEASE_WAIT_MS = 1000;

export interface LocalProviderOptions {
  modelPath: string;
  /** CPU threads of this worker's llama.cpp evaluations; 0 = node-llama-cpp's default (at least 4). */
  threads: number;
  /** Context size in tokens, per generation. */
  contextSize: number;
  /** Generations run at once in this worker; default LOCAL_DEFAULT_SEQUENCES. */
  sequences?: number;
}

const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err)).slice(0, 300);

export { validateLocalModel, type LocalModelInfo } from './local-model.js';

/**
 * The context's sequences, lent out one per generation in FIFO order. They are
 * created once and cleared between generations: disposing a sequence hands its
 * id back to llama.cpp asynchronously, so a new one could not be had at once.
 */
function createSequencePool(items: LlamaContextSequence[]) {
  const free = [...items];
  const waiting: Array<(item: LlamaContextSequence) => void> = [];
  return {
    /** Resolves with a sequence, or null if `signal` aborts first. */
    acquire(signal: AbortSignal): Promise<LlamaContextSequence | null> {
      const item = waiting.length === 0 ? free.pop() : undefined;
      if (item) return Promise.resolve(item);
      if (signal.aborted) return Promise.resolve(null);
      return new Promise((resolve) => {
        const grant = (granted: LlamaContextSequence) => {
          signal.removeEventListener('abort', onAbort);
          resolve(granted);
        };
        const onAbort = () => {
          const i = waiting.indexOf(grant);
          if (i >= 0) waiting.splice(i, 1);
          resolve(null);
        };
        waiting.push(grant);
        signal.addEventListener('abort', onAbort, { once: true });
      });
    },
    async release(item: LlamaContextSequence): Promise<void> {
      try {
        await item.clearHistory();
      } finally {
        const next = waiting.shift();
        if (next) next(item);
        else free.push(item);
      }
    },
  };
}

function toChatHistory(messages: readonly ModelMessage[]): ChatHistoryItem[] {
  const history: ChatHistoryItem[] = messages.map((m): ChatHistoryItem => {
    switch (m.role) {
      case 'system':
        return { type: 'system', text: m.content };
      case 'user':
        return { type: 'user', text: m.content };
      case 'assistant':
        return { type: 'model', response: [m.content] };
      default: {
        const role: never = m.role;
        throw new Error(`a message with the unknown role ${String(role)}`);
      }
    }
  });
  // The chat wrapper renders the prompt up to an open model turn, which the generation fills.
  history.push({ type: 'model', response: [] });
  return history;
}

/**
 * The `local` provider: a GGUF model run by node-llama-cpp (llama.cpp) on the
 * CPU inside this worker thread. The model is loaded once, here, and shared
 * by every generation of the worker; each generation borrows one sequence of
 * a single context and gives it back when it ends. Resolves once the model is
 * loaded, so a bad model fails the worker's first task (pool.check()) rather
 * than a chat.
 */
/**
 * How chatwire loads llama.cpp: only the prebuilt CPU binary from the npm package, never downloaded or compiled at
 * run time, quiet; `threads` caps its threads (undefined = the library's default). bench:upstream's direct run uses
 * the same, so that the two are compared on equal terms.
 */
export function llamaCpuOptions(threads: number | undefined) {
  return {
    gpu: false as const,
    build: 'never' as const,
    usePrebuiltBinaries: true,
    skipDownload: true,
    progressLogs: false,
    logLevel: LlamaLogLevel.error,
    ...(threads === undefined ? {} : { maxThreads: threads }),
  };
}

export async function createLocalProvider(options: LocalProviderOptions): Promise<Provider> {
  await validateLocalModel(options.modelPath);
  const sequences = options.sequences ?? LOCAL_DEFAULT_SEQUENCES;
  const threads = options.threads > 0 ? options.threads : undefined;
  let llama: Llama;
  try {
    llama = await getLlama(llamaCpuOptions(threads));
  } catch (err) {
    throw new Error(
      `the local provider cannot load llama.cpp (node-llama-cpp's prebuilt CPU binary for ${process.platform}-${process.arch}): ${errorText(err)}`,
    );
  }
  let model: LlamaModel;
  let context: LlamaContext;
  try {
    model = await llama.loadModel({ modelPath: options.modelPath, gpuLayers: 0 });
    context = await model.createContext({
      contextSize: options.contextSize,
      sequences,
      ...(threads === undefined ? {} : { threads }),
    });
  } catch (err) {
    await llama.dispose();
    throw new Error(`the local provider cannot load ${options.modelPath}: ${errorText(err)}`);
  }
  const contextSize = context.contextSize;
  const pool = createSequencePool(Array.from({ length: sequences }, () => context.getSequence()));
  // Each running generation: its abort handle, and a promise settled once it has stopped and given its sequence back.
  const active = new Set<{ abort: AbortController; generation: Promise<unknown>; released: Promise<void> }>();
  let closed = false;

  return {
    name: 'local',

    async *stream(request: ModelRequest, signal: AbortSignal): AsyncGenerator<string, ModelResult, void> {
      if (closed) throw new AppError('upstream_error', 'the local model is closed');
      if (signal.aborted) return { finishReason: 'stop', usage: { promptTokens: 0, completionTokens: 0 }, usageSource: 'counted' };
      const cancelled = (promptTokens: number, completionTokens: number): ModelResult => ({
        finishReason: 'stop',
        usage: { promptTokens, completionTokens },
        usageSource: 'counted',
      });
      const sequence = await pool.acquire(signal);
      if (sequence === null) return cancelled(0, 0);
      if (closed) {
        // Granted by a generation that close() stopped: the context is going away.
        await pool.release(sequence);
        throw new AppError('upstream_error', 'the local model is closed');
      }

      const abort = new AbortController();
      const onAbort = () => abort.abort(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      let chat: LlamaChat | undefined;
      let generation: Promise<unknown> = Promise.resolve();
      let markReleased: () => void = () => {};
      const entry = {
        abort,
        get generation() {
          return generation;
        },
        released: new Promise<void>((resolve) => {
          markReleased = resolve;
        }),
      };
      active.add(entry);
      try {
        chat = new LlamaChat({ contextSequence: sequence });
        const history = toChatHistory(request.messages);
        const promptTokens = chat.chatWrapper.generateContextState({ chatHistory: history }).contextText.tokenize(model.tokenizer).length;
        // Without maxTokens the generation ends when the context is full, never by shifting it forever.
        const maxTokens = request.maxTokens ?? Math.max(contextSize - promptTokens, Math.floor(contextSize / 4));
        let completionTokens = 0;
        const queue: string[] = [];
        let wake: (() => void) | undefined;
        let finished = false;
        let failure: unknown;
        let stopReason: string | undefined;
        generation = chat
          .generateResponse(history, {
            signal: abort.signal,
            stopOnAbortSignal: true,
            maxTokens,
            temperature: request.temperature ?? LOCAL_DEFAULT_TEMPERATURE,
            onResponseChunk(chunk) {
              // Thought segments cost tokens but are not part of the reply.
              completionTokens += chunk.tokens.length;
              if (chunk.type === undefined && chunk.text.length > 0) {
                queue.push(chunk.text);
                wake?.();
              }
            },
          })
          .then(
            (response) => {
              stopReason = response.metadata.stopReason;
            },
            (err: unknown) => {
              failure = err;
            },
          )
          .finally(() => {
            finished = true;
            wake?.();
          });

        for (;;) {
          while (queue.length > 0) yield queue.shift() as string;
          if (finished) break;
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
        }
        if (signal.aborted) return cancelled(promptTokens, completionTokens);
        if (stopReason === 'abort') throw new AppError('upstream_error', 'the local model was closed during the generation');
        if (failure !== undefined) throw new AppError('upstream_error', `the local model failed: ${errorText(failure)}`);
        return {
          finishReason: stopReason === 'maxTokens' ? 'length' : 'stop',
          usage: { promptTokens, completionTokens },
          usageSource: 'counted',
        };
      } finally {
        signal.removeEventListener('abort', onAbort);
        // Reached early when the consumer stops iterating: stop the generation before the sequence is reused.
        abort.abort();
        await generation;
        chat?.dispose({ disposeSequence: false });
        try {
          await pool.release(sequence);
        } finally {
          active.delete(entry);
          markReleased();
        }
      }
    },

    async check() {
      if (closed) throw new Error('the local model is closed');
      if (model.tokenize('ok').length === 0) throw new Error('the local model does not tokenize');
    },

    async close() {
      if (closed) return;
      closed = true;
      for (const g of active) g.abort.abort();
      await Promise.all([...active].map((g) => g.generation));
      // llama.cpp work still queued for a sequence (its clearing) must finish before the context goes, or a
      // worker thread terminated next would crash the process; a stream nobody reads any more is not waited for long.
      await Promise.race([Promise.all([...active].map((g) => g.released)), sleep(CLOSE_RELEASE_WAIT_MS)]);
      await context.dispose();
      await model.dispose();
      await llama.dispose();
    },
  };
}
