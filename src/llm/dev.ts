import crypto from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppError } from '../protocol/index.js';
import { countTokens, type ModelRequest, type ModelResult, type Provider } from './provider.js';

export const DEV_DEFAULT_MAX_TOKENS = 32;

// A fixed vocabulary: the reply is a pure function of (model, params, messages).
const WORDS = (
  'the a service provider quote booking request schedule price job home repair clean garden paint move ' +
  'plumber electrician available tomorrow morning afternoon evening week estimate hour hours fixed rate ' +
  'materials included deposit confirm review rating local licensed insured team visit inspect measure ' +
  'replace install fix check quick simple careful friendly trusted nearby today soon next flexible ' +
  'budget detail photo size room kitchen bath roof fence floor wall window door light water heat cool ' +
  'and or with for to from in on at by of is are can will would should could may this that it you we'
).split(' ');

export interface DevProviderOptions {
  tokenDelayMs: number;
  /** Honour `/fault exit|throw|hang` messages: used by the fault-injection tests. */
  faults: boolean;
}

/** Seed of a request: a hash of everything that determines the output. */
function seedOf(request: ModelRequest): Buffer {
  const canonical = JSON.stringify([request.model, request.temperature ?? null, request.maxTokens ?? null, request.messages]);
  return crypto.createHash('sha256').update(canonical).digest();
}

/**
 * The reply's token stream for `seed`: sfc32, a small counter-based PRNG,
 * seeded with the request's hash. Deterministic, and each token costs a few
 * integer operations instead of a hash (the worker threads' main cost at
 * delay 0).
 */
function tokenStream(seed: Buffer): () => string {
  let a = seed.readUInt32BE(0);
  let b = seed.readUInt32BE(4);
  let c = seed.readUInt32BE(8);
  let d = seed.readUInt32BE(12);
  const next = (): number => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return t >>> 0;
  };
  for (let i = 0; i < 12; i++) next();
  let first = true;
  return () => {
    const word = WORDS[next() % WORDS.length] as string;
    if (!first) return ` ${word}`;
    first = false;
    return word.charAt(0).toUpperCase() + word.slice(1);
  };
}

async function injectFault(text: string): Promise<void> {
  const m = /^\/fault (exit|throw|hang|upstream)\b/.exec(text);
  if (!m) return;
  switch (m[1]) {
    case 'exit':
      // Ends the worker thread itself, as a native crash would.
      process.exit(1);
      break;
    case 'throw':
      // An error that escapes the task: the worker is torn down.
      setImmediate(() => {
        throw new Error('injected worker fault');
      });
      await sleep(1000);
      break;
    case 'hang': {
      const end = Date.now() + 3_600_000;
      while (Date.now() < end) {
        // Busy loop: the worker does not answer anything until it is terminated.
      }
      break;
    }
    case 'upstream':
      throw new AppError('upstream_error', 'injected upstream failure');
  }
}

/**
 * The deterministic `dev` provider: `maxTokens` word tokens (default 32),
 * one every `tokenDelayMs`. finishReason is `length` when the request set
 * maxTokens (the reply was cut there), else `stop`.
 */
export function createDevProvider(options: DevProviderOptions): Provider {
  return {
    name: 'dev',
    async *stream(request: ModelRequest, signal: AbortSignal): AsyncGenerator<string, ModelResult, void> {
      const last = request.messages.at(-1);
      if (options.faults && last?.role === 'user') await injectFault(last.content);
      const nextToken = tokenStream(seedOf(request));
      const n = request.maxTokens ?? DEV_DEFAULT_MAX_TOKENS;
      const promptTokens = request.messages.reduce((sum, m) => sum + countTokens(m.content), 0);
      let produced = 0;
      for (let i = 0; i < n; i++) {
        if (signal.aborted) break;
        if (options.tokenDelayMs > 0) {
          try {
            await sleep(options.tokenDelayMs, undefined, { signal });
          } catch {
            break;
          }
        } else {
          // Even at delay 0 each token is its own turn of the worker's event loop: the reply streams
          // instead of arriving whole, and a cancel is heard between two tokens.
          await new Promise<void>((resolve) => setImmediate(resolve));
        }
        yield nextToken();
        produced++;
      }
      return {
        finishReason: request.maxTokens !== undefined ? 'length' : 'stop',
        usage: { promptTokens, completionTokens: produced },
        usageSource: 'counted',
      };
    },
  };
}
