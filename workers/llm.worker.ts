/**
 * The Piscina task: runs one model call with the configured provider and
 * streams its chunks back over a MessagePort. The port carries everything in
 * order (chunks, then exactly one `end` or `error`), so the main thread never
 * races the task's own completion against the last chunk.
 */
import type { MessagePort } from 'node:worker_threads';
import { BroadcastChannel, threadId, workerData } from 'node:worker_threads';
import type { ControlMessage } from '../src/llm/pool.js';
import { createProvider } from '../src/llm/providers.js';
import type { ModelRequest, Provider, ProviderSettings } from '../src/llm/provider.js';
import type { WorkerEvent, WorkerTask } from '../src/llm/worker-protocol.js';
import { isAppError } from '../src/protocol/index.js';

const { settings, controlChannel } = workerData as { settings: ProviderSettings; controlChannel?: string };
let provider: Promise<Provider> | undefined;

// Piscina terminates workers without notice: on this channel the pool asks a provider that holds resources
// (the local provider's llama.cpp model) to release them first.
const control = controlChannel === undefined ? undefined : new BroadcastChannel(controlChannel);
if (control) {
  control.unref();
  control.onmessage = (event) => {
    if ((event as { data: ControlMessage }).data.t === 'close') void closeProvider(control);
  };
}

function getProvider(): Promise<Provider> {
  provider ??= createProvider(settings).then((created) => {
    if (created.close) control?.postMessage({ t: 'opened', threadId } satisfies ControlMessage);
    return created;
  });
  return provider;
}

async function closeProvider(channel: BroadcastChannel): Promise<void> {
  try {
    await (await provider)?.close?.();
  } catch {
    // The pool terminates this thread next, whatever happened: a provider that failed to start or to close has nothing left to free.
  } finally {
    channel.postMessage({ t: 'closed', threadId } satisfies ControlMessage);
  }
}

function isAbortError(err: unknown): boolean {
  return err instanceof Error && (err.name === 'AbortError' || err.name === 'APIUserAbortError');
}

async function streamModel(request: ModelRequest, port: MessagePort): Promise<void> {
  const controller = new AbortController();
  port.on('message', (msg: { t?: string }) => {
    if (msg?.t === 'cancel') controller.abort();
  });
  const post = (event: WorkerEvent) => port.postMessage(event);
  // Chunks produced within one turn of the event loop go out as one message.
  let pending = '';
  let flushScheduled = false;
  const flush = () => {
    flushScheduled = false;
    if (pending.length === 0) return;
    post({ t: 'chunk', text: pending });
    pending = '';
  };
  try {
    const model = await getProvider();
    post({ t: 'start', threadId });
    const iterator = model.stream(request, controller.signal);
    for (;;) {
      const step = await iterator.next();
      if (step.done) {
        flush();
        post({ t: 'end', result: step.value, cancelled: controller.signal.aborted });
        return;
      }
      if (step.value.length === 0) continue;
      pending += step.value;
      if (!flushScheduled) {
        flushScheduled = true;
        setImmediate(flush);
      }
    }
  } catch (err) {
    flush();
    if (controller.signal.aborted && (isAbortError(err) || !isAppError(err))) {
      post({ t: 'end', result: null, cancelled: true });
    } else if (isAppError(err)) {
      post({ t: 'error', code: err.code, message: err.message, retryAfterMs: err.retryAfterMs });
    } else {
      post({ t: 'error', code: 'internal', message: err instanceof Error ? err.message : String(err) });
    }
  } finally {
    port.close();
  }
}

export default async function run(task: WorkerTask): Promise<string | null> {
  switch (task.kind) {
    case 'stream':
      await streamModel(task.request, task.port);
      return null;
    case 'check': {
      const model = await getProvider();
      await model.check?.();
      return 'ok';
    }
  }
}
