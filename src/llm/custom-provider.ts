/**
 * createChatwire's `provider` option: a custom model provider, as a module the worker threads load (the way dev,
 * openai and local are loaded) or as an object the host built, run on the main thread (inline-pool.ts says what
 * that can and cannot do).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { chunksOf, countTokens, type ModelRequest, type ModelResult, type Provider, type ProviderModule } from './provider.js';

/** What a provider's stream or streamTo ends with: its ModelResult, or nothing. */
// biome-ignore lint/suspicious/noConfusingVoidType: `void`, not `undefined`, so that an async method returning nothing (Promise<void>) fits
type ModelResultOrNothing = ModelResult | void;

/**
 * A model provider of the host's: `stream` (an async generator of text chunks) or `streamTo` (chunks handed to
 * `onChunk`), either returning the ModelResult or nothing (then the reply ends with `stop`, and its usage is counted
 * by chatwire). It must stop promptly when `signal` aborts, and may throw an AppError (`upstream_error`,
 * `upstream_timeout`, ...) to fail the chat with that code; any other error fails it as `internal`.
 */
export interface CustomProvider {
  readonly name: string;
  stream?(request: ModelRequest, signal: AbortSignal): AsyncIterator<string, ModelResultOrNothing> | AsyncIterable<string>;
  streamTo?(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResultOrNothing>;
  /** Readiness (/readyz): resolves when the provider can serve. */
  check?(): Promise<void>;
  /** Called once at close. */
  close?(): Promise<void>;
}

/** A provider module: its default export is `(options) => Provider | Promise<Provider>`, or a Provider object. */
export interface ProviderModuleOption {
  /** What the hello frame names as the provider, and part of every cache key. */
  name: string;
  /** An absolute path, a path relative to the working directory, or a file: URL (e.g. `new URL('./p.js', import.meta.url)`). */
  module: string | URL;
  /** Handed to the module's factory in each worker thread: plain data only (it is copied with structuredClone). */
  options?: unknown;
}

export type ProviderOption = ProviderModuleOption | CustomProvider;

export type ProviderChoice = { kind: 'module'; module: ProviderModule } | { kind: 'object'; provider: CustomProvider };

// The built-in names: a custom provider must not pass for one (the cache treats `dev` replies as reproducible).
const RESERVED = new Set(['dev', 'openai', 'local']);
const NAME = /^[A-Za-z0-9._-]{1,64}$/;

function checkName(name: unknown): string | null {
  if (typeof name !== 'string' || !NAME.test(name)) return 'name must be 1..64 characters of A-Za-z0-9._-';
  if (RESERVED.has(name)) return `name ${name} is a built-in provider's: choose another`;
  return null;
}

function moduleUrl(spec: string | URL): URL | string {
  if (spec instanceof URL) return spec.protocol === 'file:' ? spec : 'module must be a file: URL or a path';
  if (typeof spec !== 'string' || spec.trim() === '') return 'module must be a file: URL or a path';
  return spec.startsWith('file:') ? new URL(spec) : pathToFileURL(path.resolve(spec));
}

/** Checks the option in the main thread, so that a wrong path or options that cannot cross into a worker fail at once. */
export function resolveProviderOption(option: ProviderOption): ProviderChoice | string {
  if (typeof option !== 'object' || option === null) return 'expected { name, module, options? } or a provider object { name, stream(request, signal) }';
  const badName = checkName(option.name);
  if (badName !== null) return badName;
  if ('module' in option && option.module !== undefined) {
    const url = moduleUrl(option.module);
    if (typeof url === 'string') return url;
    if (!fs.existsSync(fileURLToPath(url))) return `module ${fileURLToPath(url)} does not exist`;
    try {
      structuredClone(option.options);
    } catch (err) {
      return `options must be plain data a worker thread can receive (${err instanceof Error ? err.message : String(err)})`;
    }
    return { kind: 'module', module: { name: option.name, href: url.href, options: option.options } };
  }
  if (!isCustomProvider(option)) return 'expected { name, module, options? } or a provider object { name, stream(request, signal) }';
  return { kind: 'object', provider: option as CustomProvider };
}

export function choiceName(choice: ProviderChoice): string {
  return choice.kind === 'module' ? choice.module.name : choice.provider.name;
}

/** The backend fingerprint (see backend.ts) of a custom provider: its name, and for a module the file it loads. */
export function choiceFingerprint(choice: ProviderChoice): string {
  return choice.kind === 'module' ? `custom ${choice.module.name} ${choice.module.href}` : `custom ${choice.provider.name}`;
}

export function isCustomProvider(value: unknown): value is CustomProvider {
  const p = value as CustomProvider | null;
  return typeof p === 'object' && p !== null && (typeof p.stream === 'function' || typeof p.streamTo === 'function');
}

function iteratorOf(source: AsyncIterator<string, ModelResultOrNothing> | AsyncIterable<string>): AsyncIterator<string, ModelResultOrNothing> {
  const iterable = source as AsyncIterable<string>;
  return typeof iterable[Symbol.asyncIterator] === 'function' && typeof (source as AsyncIterator<string>).next !== 'function'
    ? iterable[Symbol.asyncIterator]()
    : (source as AsyncIterator<string, ModelResultOrNothing>);
}

/**
 * The host's provider as chatwire calls one: chunks handed over as they come, and a ModelResult always (counted,
 * with finishReason `stop`, when the provider returned none). Runs on the main thread or in a worker alike.
 */
export function asProvider(custom: CustomProvider): Provider & { streamTo: NonNullable<Provider['streamTo']> } {
  const counted = (request: ModelRequest, text: string): ModelResult => ({
    finishReason: 'stop',
    usage: { promptTokens: request.messages.reduce((n, m) => n + countTokens(m.content), 0), completionTokens: countTokens(text) },
    usageSource: 'counted',
  });
  const streamTo = async (request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult> => {
    let text = '';
    const take = (chunk: string) => {
      if (typeof chunk !== 'string' || chunk.length === 0) return;
      text += chunk;
      onChunk(chunk);
    };
    if (custom.streamTo) return (await custom.streamTo(request, signal, take)) ?? counted(request, text);
    const it = iteratorOf((custom.stream as NonNullable<CustomProvider['stream']>)(request, signal));
    for (;;) {
      const step = await it.next();
      if (step.done) return step.value ?? counted(request, text);
      take(step.value);
    }
  };
  const provider: Provider & { streamTo: typeof streamTo } = {
    name: custom.name,
    streamTo,
    stream: (request, signal) => chunksOf((stop, onChunk) => streamTo(request, stop, onChunk), signal),
  };
  if (custom.check) provider.check = () => (custom.check as () => Promise<void>).call(custom);
  if (custom.close) provider.close = () => (custom.close as () => Promise<void>).call(custom);
  return provider;
}
