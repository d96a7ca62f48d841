/**
 * The Piscina task: runs one model call with the configured provider and
 * streams its chunks back over this worker's event port. The port carries
 * everything of a call in order (start, chunks, then exactly one `end` or
 * `error`), so the main thread never races the task's own completion against
 * the last chunk.
 */
import { BroadcastChannel, MessageChannel, parentPort, threadId, workerData } from 'node:worker_threads';
import type { ControlMessage } from '../src/llm/pool.js';
import { createProvider } from '../src/llm/providers.js';
import type { ModelRequest, Provider, ProviderSettings } from '../src/llm/provider.js';
import type { PoolCommand, WorkerEvent, WorkerHello, WorkerTask } from '../src/llm/worker-protocol.js';
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

// One port for the events of every call this worker runs, handed to the pool once (see WorkerHello).
const events = new MessageChannel();
const running = new Map<number, AbortController>();
events.port1.on('message', (command: PoolCommand) => {
  if (command.t === 'cancel') running.get(command.id)?.abort();
});
// Piscina's own port keeps the worker alive; this one must not keep an idle worker from being retired.
events.port1.unref();
parentPort?.postMessage({ t: 'events', threadId, port: events.port2 } satisfies WorkerHello, [events.port2]);

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

// New calls start one per turn of the event loop. Piscina hands over every task that arrived at once, and setting
// up a call (building and sending an HTTP request) is the costliest thing a worker does: started back to back, a
// burst of 50 calls would hold up the reads of every running stream, and of each other's answers, until the last
// was sent. Between two starts the worker now reads what arrived.
const startQueue: Array<() => void> = [];
function startTurn(): Promise<void> {
  return new Promise((resolve) => {
    startQueue.push(resolve);
    if (startQueue.length === 1) setImmediate(startNext);
  });
}
function startNext(): void {
  startQueue.shift()?.();
  if (startQueue.length > 0) setImmediate(startNext);
}

async function streamModel(id: number, request: ModelRequest): Promise<void> {
  const controller = new AbortController();
  running.set(id, controller);
  const post = (event: WorkerEvent) => events.port1.postMessage(event);
  // A chunk goes out at once, unless one already went out in this turn of the event loop: the chunks that follow
  // it in the same turn (a network read holding several deltas, a burst) go out together at the turn's end.
  let pending = '';
  let postedThisTurn = false;
  const flush = () => {
    postedThisTurn = false;
    if (pending.length === 0) return;
    post({ id, t: 'chunk', text: pending });
    pending = '';
  };
  const chunk = (text: string) => {
    if (postedThisTurn) {
      pending += text;
      return;
    }
    postedThisTurn = true;
    post({ id, t: 'chunk', text });
    setImmediate(flush);
  };
  try {
    const model = await getProvider();
    await startTurn();
    post({ id, t: 'start', threadId });
    const iterator = model.stream(request, controller.signal);
    for (;;) {
      const step = await iterator.next();
      if (step.done) {
        flush();
        post({ id, t: 'end', result: step.value, cancelled: controller.signal.aborted });
        return;
      }
      if (step.value.length === 0) continue;
      chunk(step.value);
    }
  } catch (err) {
    flush();
    if (controller.signal.aborted && (isAbortError(err) || !isAppError(err))) {
      post({ id, t: 'end', result: null, cancelled: true });
    } else if (isAppError(err)) {
      post({ id, t: 'error', code: err.code, message: err.message, retryAfterMs: err.retryAfterMs });
    } else {
      post({ id, t: 'error', code: 'internal', message: err instanceof Error ? err.message : String(err) });
    }
  } finally {
    running.delete(id);
  }
}

export default async function run(task: WorkerTask): Promise<string | null> {
  switch (task.kind) {
    case 'stream':
      await streamModel(task.id, task.request);
      return null;
    case 'check': {
      const model = await getProvider();
      await model.check?.();
      return 'ok';
    }
  }
}
