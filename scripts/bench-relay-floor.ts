/**
 * The floor under chatwire's relay, for `npm run bench:upstream`: the least a process can do to relay an upstream's
 * stream to /ws clients on this machine, measured next to chatwire in the same run.
 *
 * It serves /ws on a uWebSockets.js app (the package chatwire uses), takes a `chat.send` frame, makes the streaming
 * POST that chatwire's openai provider makes on the same HTTP client (src/llm/upstream-http.ts: undici's dispatch,
 * SseParser) and writes one `chat.delta` frame per chunk in chatwire's JSON shape, after a `chat.ack` and before a
 * `chat.done`: bench-upstream's /ws client reads it as it reads chatwire. What it leaves out is chatwire's: no
 * pool, tasks, storage, limits, metrics, timeouts or retries. Two modes (BENCH_FLOOR_MODE):
 * - inline: the upstream read, the parse and the frame on the main thread: two socket hops and the work per token;
 * - worker: the upstream read and the parse in one worker thread, its chunks posted to the main thread one message
 *   per turn of the worker's event loop as chatwire's workers post them (workers/llm.worker.ts): the floor of the
 *   architecture where model calls run off the main thread.
 *
 * BENCH_UPSTREAM_URL is the upstream's base URL (`http://127.0.0.1:<port>/v1`). Prints `port=N` when listening.
 * This file is both the process and, in worker mode, its worker thread.
 */
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import type { ChatCompletionChunk } from 'openai/resources/chat/completions';
import uWS, { type WebSocket } from 'uWebSockets.js';
import { createUpstreamHttp, SseParser, type UpstreamHttp } from '../src/llm/upstream-http.js';
import { assertNativeUws } from '../src/transport/server.js';

interface Usage {
  promptTokens: number;
  completionTokens: number;
}

/** What one call tells its relay, in order: texts, then exactly one end. */
interface CallSink {
  text(text: string): void;
  end(usage: Usage | null, error: string | null): void;
}

/** The request chatwire's openai provider sends for a chat (src/llm/openai.ts, bodyOf). */
function completionBody(text: string, maxTokens: number | undefined): string {
  return JSON.stringify({
    model: 'fake-1',
    messages: [{ role: 'user', content: text }],
    stream: true,
    stream_options: { include_usage: true },
    ...(maxTokens === undefined ? {} : { max_tokens: maxTokens }),
  });
}

/**
 * One streamed completion read as the openai provider reads it: the upstream's body bytes to SseParser, each event
 * JSON-parsed, its first choice's content to `sink`. Returns the request's abort.
 */
function streamCompletion(upstream: UpstreamHttp, body: string, sink: CallSink): (reason: Error) => void {
  let status = 0;
  let done = false;
  let usage: Usage | null = null;
  const parser = new SseParser((_event, data) => {
    if (data.startsWith('[DONE]')) {
      done = true;
      parser.stop();
      return;
    }
    const chunk = JSON.parse(data) as ChatCompletionChunk;
    if (chunk.usage) usage = { promptTokens: chunk.usage.prompt_tokens, completionTokens: chunk.usage.completion_tokens };
    const content = chunk.choices[0]?.delta?.content;
    if (typeof content === 'string' && content.length > 0) sink.text(content);
  });
  return upstream.send(
    {
      method: 'POST',
      path: '/chat/completions',
      headers: { authorization: 'Bearer bench', 'content-type': 'application/json', accept: 'text/event-stream' },
      body,
    },
    {
      head(s) {
        status = s;
      },
      data(chunk) {
        if (status === 200) parser.write(chunk);
      },
      end() {
        parser.end();
        sink.end(usage, status === 200 && done ? null : `the upstream answered ${status}${done ? '' : ' without [DONE]'}`);
      },
      error(err) {
        sink.end(null, err.message);
      },
    },
  );
}

// ---- worker mode: the worker thread ----

/** Main thread to worker: start call `id`. */
interface StartCall {
  id: number;
  body: string;
}
/** A call's end, in a batch. */
interface CallEnd {
  id: number;
  usage: Usage | null;
  error: string | null;
}
/** Worker to main thread, as chatwire's WorkerBatch: a chunk is two entries (call id, text), an end one. */
type Batch = Array<number | string | CallEnd>;

/** The worker: reads every call's stream and posts what it parsed, one message per turn of its event loop. */
function runWorker(baseUrl: string): void {
  const port = parentPort as NonNullable<typeof parentPort>;
  const upstream = createUpstreamHttp(baseUrl);
  let batch: Batch = [];
  let batchNo = 0;
  let scheduled = false;
  const postBatch = () => {
    scheduled = false;
    if (batch.length === 0) return;
    const out = batch;
    batch = [];
    batchNo++;
    port.postMessage(out);
  };
  port.on('message', ({ id, body }: StartCall) => {
    // A call's chunks of one turn travel as one text, as in workers/llm.worker.ts.
    let at = -1;
    let atBatch = -1;
    streamCompletion(upstream, body, {
      text(text) {
        if (atBatch === batchNo) {
          batch[at] += text;
          return;
        }
        at = batch.length + 1;
        atBatch = batchNo;
        batch.push(id, text);
        if (scheduled) return;
        scheduled = true;
        setImmediate(postBatch);
      },
      end(usage, error) {
        batch.push({ id, usage, error });
        postBatch();
      },
    });
  });
}

// ---- the process: /ws ----

// A socket that closes lets its calls run out (a reply lasts a fraction of a second); their frames are dropped.
interface SocketData {
  closed: boolean;
}
type Socket = WebSocket<SocketData>;

/** One relayed chat: its socket and the frames it has written. */
class Relay implements CallSink {
  private readonly taskId = randomUUID();
  private readonly messageId = randomUUID();
  private readonly started = performance.now();
  private firstTokenMs: number | null = null;
  private seq = 0;

  constructor(
    private readonly ws: Socket,
    id: string | undefined,
  ) {
    this.send({
      type: 'chat.ack',
      taskId: this.taskId,
      conversationId: randomUUID(),
      messageId: this.messageId,
      status: 'queued',
      rateLimit: { limit: 1_000_000, remaining: 999_999, resetMs: 60_000 },
      ...(id === undefined ? {} : { id }),
    });
  }

  text(text: string): void {
    this.firstTokenMs ??= performance.now() - this.started;
    this.send({ type: 'chat.delta', taskId: this.taskId, seq: this.seq++, text });
  }

  end(usage: Usage | null, error: string | null): void {
    if (error !== null) {
      this.send({ type: 'chat.error', taskId: this.taskId, code: 'upstream_error', message: error, retryable: true });
      return;
    }
    this.send({
      type: 'chat.done',
      taskId: this.taskId,
      messageId: this.messageId,
      finishReason: 'stop',
      usage: usage ?? { promptTokens: 0, completionTokens: 0 },
      cached: false,
      timings: { queueMs: 0, firstTokenMs: this.firstTokenMs, totalMs: performance.now() - this.started },
    });
  }

  private send(message: object): void {
    const ws = this.ws;
    if (ws.getUserData().closed) return;
    // Corked as chatwire writes: one write(2) per frame, not one per part of it.
    ws.cork(() => ws.send(JSON.stringify(message), false));
  }
}

interface ChatSend {
  type: string;
  id?: string;
  text?: string;
  params?: { maxTokens?: number };
}

/** Starts one call: on this thread (inline), or in the worker, whose batches come back to the relays. */
type StartFn = (body: string, relay: Relay) => void;

function inlineStart(baseUrl: string): StartFn {
  const upstream = createUpstreamHttp(baseUrl);
  return (body, relay) => {
    streamCompletion(upstream, body, relay);
  };
}

function workerStart(baseUrl: string): StartFn {
  const worker = new Worker(fileURLToPath(import.meta.url), { workerData: { baseUrl } });
  const calls = new Map<number, Relay>();
  let nextId = 0;
  worker.on('message', (batch: Batch) => {
    for (let i = 0; i < batch.length; i++) {
      const entry = batch[i] as number | CallEnd;
      if (typeof entry === 'number') {
        calls.get(entry)?.text(batch[++i] as string);
        continue;
      }
      calls.get(entry.id)?.end(entry.usage, entry.error);
      calls.delete(entry.id);
    }
  });
  worker.on('error', (err) => {
    console.error(err);
    process.exit(1);
  });
  return (body, relay) => {
    const id = nextId++;
    calls.set(id, relay);
    worker.postMessage({ id, body } satisfies StartCall);
  };
}

const baseUrl: string = isMainThread ? (process.env.BENCH_UPSTREAM_URL ?? '') : (workerData as { baseUrl: string }).baseUrl;
if (!isMainThread) {
  runWorker(baseUrl);
} else {
  const mode = process.env.BENCH_FLOOR_MODE ?? 'inline';
  if (mode !== 'inline' && mode !== 'worker') throw new Error(`BENCH_FLOOR_MODE must be inline or worker, not ${mode}`);
  if (!baseUrl) throw new Error('BENCH_UPSTREAM_URL is required');
  assertNativeUws();
  const start = mode === 'inline' ? inlineStart(baseUrl) : workerStart(baseUrl);
  const app = uWS.App();
  app.ws<SocketData>('/ws', {
    maxPayloadLength: 64 * 1024,
    maxBackpressure: 16 * 1024 * 1024,
    idleTimeout: 120,
    compression: uWS.DISABLED,
    upgrade: (res, req, context) => {
      res.upgrade<SocketData>(
        { closed: false },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    message: (ws, message) => {
      const frame = JSON.parse(Buffer.from(message).toString('utf8')) as ChatSend;
      if (frame.type !== 'chat.send' || typeof frame.text !== 'string') return;
      start(completionBody(frame.text, frame.params?.maxTokens), new Relay(ws, frame.id));
    },
    close: (ws) => {
      ws.getUserData().closed = true;
    },
  });
  app.listen('127.0.0.1', 0, (socket) => {
    if (!socket) {
      console.error('the relay floor could not listen');
      process.exit(1);
    }
    console.log(`port=${uWS.us_socket_local_port(socket as unknown as uWS.us_socket)}`);
  });
  process.on('SIGTERM', () => process.exit(0));
}
