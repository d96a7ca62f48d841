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
import type { ModelRequest, ModelResult, Provider, ProviderSettings } from '../src/llm/provider.js';
import {
  startingMark,
  type PoolCommand,
  type WorkerBatch,
  type WorkerEvent,
  type WorkerHello,
  type WorkerTask,
  type WorkerWarm,
} from '../src/llm/worker-protocol.js';
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
// The call this thread is starting, for the pool to see should the provider hang before the call's `start` is posted.
const starting = new Int32Array(new SharedArrayBuffer(4));
parentPort?.postMessage({ t: 'events', threadId, port: events.port2, starting } satisfies WorkerHello, [events.port2]);

// Warm as the thread starts: create the provider and run its check, which opens the upstream's keep-alive
// connection (openai) or loads the model (local). A failed check is the readiness check's to report; the worker is up.
void getProvider()
  .then((created) => created.check?.())
  .catch(() => {})
  .finally(() => parentPort?.postMessage({ t: 'warm', threadId } satisfies WorkerWarm));

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
// was sent. Between two starts the worker now reads what arrived. The first call of a turn starts at once, without
// waiting for a turn of its own (a steady stream of chats, one at a time, never waits); the others wait their turn.
let turnTaken = false;
const startQueue: Array<() => void> = [];
function takeTurn(): void {
  turnTaken = true;
  setImmediate(endTurn);
}
function endTurn(): void {
  turnTaken = false;
  const next = startQueue.shift();
  if (next) {
    takeTurn();
    next();
  }
}
/** Resolves (or returns undefined, when the call may start now) when this call's turn to start has come. */
function startTurn(): Promise<void> | undefined {
  if (!turnTaken) {
    takeTurn();
    return undefined;
  }
  return new Promise((resolve) => startQueue.push(resolve));
}

// What the calls post, batched (see WorkerBatch): the chunks of one turn of the event loop leave together when the
// turn ends. A chunk waits only for the rest of the turn's reads, which are where the others come from.
let batch: WorkerBatch = [];
let batchNo = 0;
let batchScheduled = false;
function postBatch(): void {
  batchScheduled = false;
  if (batch.length === 0) return;
  const out = batch;
  batch = [];
  batchNo++;
  events.port1.postMessage(out);
}
function postSoon(): void {
  if (batchScheduled) return;
  batchScheduled = true;
  setImmediate(postBatch);
}
function post(event: WorkerEvent): void {
  batch.push(event);
  // Events leave at once: `start` tells the pool which thread to terminate should the call hang it, and `end`
  // goes ahead of the task's own completion on Piscina's port (see the pool's end marker).
  postBatch();
}

async function streamModel(id: number, request: ModelRequest): Promise<void> {
  const controller = new AbortController();
  running.set(id, controller);
  // Where this call's text sits in the batch, if it has some there: its chunks of one turn travel as one.
  let at = -1;
  let atBatch = -1;
  // `start` is posted once the provider has started the call (for the openai provider: its request sent), not before:
  // the message and the main thread's wake-up it causes would otherwise come ahead of the request. Until then the
  // pool reads the call's id in `starting`; a provider that hangs before it returns is found there.
  let started = false;
  const postStart = () => {
    if (started) return;
    started = true;
    Atomics.store(starting, 0, 0);
    post({ id, t: 'start', threadId });
  };
  const chunk = (text: string) => {
    if (text.length === 0) return;
    postStart();
    if (atBatch === batchNo) {
      batch[at] += text;
      return;
    }
    at = batch.length + 1;
    atBatch = batchNo;
    batch.push(id, text);
    postSoon();
  };
  try {
    const model = await getProvider();
    const turn = startTurn();
    if (turn) await turn;
    const signal = controller.signal;
    Atomics.store(starting, 0, startingMark(id));
    let call: Promise<ModelResult>;
    try {
      call = model.streamTo ? model.streamTo(request, signal, chunk) : drain(model.stream(request, signal), chunk);
    } finally {
      postStart();
    }
    const result = await call;
    post({ id, t: 'end', result, cancelled: signal.aborted });
  } catch (err) {
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

async function drain(stream: AsyncGenerator<string, ModelResult, void>, onChunk: (text: string) => void): Promise<ModelResult> {
  for (;;) {
    const step = await stream.next();
    if (step.done) return step.value;
    onChunk(step.value);
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
