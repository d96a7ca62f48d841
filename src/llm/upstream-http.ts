import http from 'node:http';
import https from 'node:https';

/**
 * The HTTP client under the openai provider's SDK: a `fetch` over node:http(s)
 * with keep-alive agents, and direct access to a streaming response's body.
 *
 * Why not the global fetch (undici): per streamed token, undici's body goes
 * through WHATWG streams and the SDK's SSE decoder through three more async
 * generators; measured against a fake upstream that cost 50 to 70 µs of CPU per
 * token in the worker, and the SDK's request path (its Headers, the Response)
 * about 0.9 ms per call. Here the SDK still builds, authenticates and sends the
 * request and turns HTTP failures into its APIErrors; a streaming body is then
 * read straight from the Node stream by SseReader. About 25 µs per token.
 */
export interface UpstreamHttp {
  /** The `fetch` for the SDK's client options. */
  fetch(input: string | URL | Request, init?: RequestInit): Promise<Response>;
  /** The Node stream under a Response this fetch made: an event stream's only body (its Response has none). */
  bodyOf(response: Response): http.IncomingMessage | undefined;
}

// Free connections are closed after this long (or the server's own `Keep-Alive: timeout` less a second, if
// shorter): reusing one that the server is about to close would fail the request. undici's default too.
const IDLE_CONNECTION_MS = 4000;
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);

export function createUpstreamHttp(): UpstreamHttp {
  const agents = {
    'http:': new http.Agent({ keepAlive: true, timeout: IDLE_CONNECTION_MS }),
    'https:': new https.Agent({ keepAlive: true, timeout: IDLE_CONNECTION_MS }),
  };
  const bodies = new WeakMap<Response, http.IncomingMessage>();

  function fetch(input: string | URL | Request, init: RequestInit = {}): Promise<Response> {
    if (typeof input !== 'string' && !(input instanceof URL)) return Promise.reject(new TypeError('only URL inputs are supported'));
    const url = typeof input === 'string' ? new URL(input) : input;
    const agent = url.protocol === 'https:' ? agents['https:'] : url.protocol === 'http:' ? agents['http:'] : undefined;
    if (!agent) return Promise.reject(new TypeError(`unsupported protocol ${url.protocol}`));
    const body = init.body ?? undefined;
    if (body !== undefined && typeof body !== 'string' && !(body instanceof Uint8Array)) {
      return Promise.reject(new TypeError('only string and byte request bodies are supported'));
    }
    const headers = plainHeaders(init.headers);
    // The SDK's body is a JSON string: a length instead of chunked encoding, which some servers refuse.
    if (body !== undefined && headers['content-length'] === undefined) headers['content-length'] = String(Buffer.byteLength(body));
    // No compression: undici would decode it, node:http does not.
    headers['accept-encoding'] = 'identity';
    return new Promise((resolve, reject) => {
      const req = (url.protocol === 'https:' ? https : http).request(
        url,
        { method: init.method ?? 'GET', headers, agent, ...(init.signal ? { signal: init.signal } : {}) },
        (res) => {
          const status = res.statusCode ?? 0;
          // An event stream is read by SseReader alone: building a web stream for it would cost more than the rest.
          const eventStream = /^text\/event-stream/i.test(res.headers['content-type'] ?? '');
          const response = new Response(NULL_BODY_STATUS.has(status) || eventStream ? null : lazyBody(res), {
            status,
            statusText: res.statusMessage ?? '',
            headers: responseHeaders(res.rawHeaders),
          });
          bodies.set(response, res);
          resolve(response);
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  }

  return { fetch, bodyOf: (response) => bodies.get(response) };
}

/** What fetch's `headers` option takes (Node's global Headers accepts the same). */
type HeadersInit = ConstructorParameters<typeof Headers>[0];

function plainHeaders(init: HeadersInit): Record<string, string> {
  const out: Record<string, string> = {};
  if (init instanceof Headers) init.forEach((value, name) => (out[name] = value));
  else if (Array.isArray(init)) for (const [name, value] of init) out[(name as string).toLowerCase()] = value as string;
  else if (init) for (const [name, value] of Object.entries(init)) out[name.toLowerCase()] = typeof value === 'string' ? value : value.join(', ');
  return out;
}

function responseHeaders(raw: string[]): Headers {
  const headers = new Headers();
  for (let i = 0; i + 1 < raw.length; i += 2) headers.append(raw[i] as string, raw[i + 1] as string);
  return headers;
}

/**
 * The body as a web stream for whoever reads it through the Response (the SDK, for error bodies and model lists).
 * Nothing is read from the Node stream until then, so SseReader can take it instead.
 */
function lazyBody(res: http.IncomingMessage): ReadableStream<Uint8Array> {
  let attached = false;
  return new ReadableStream<Uint8Array>(
    {
      pull(controller) {
        if (attached) {
          res.resume();
          return;
        }
        attached = true;
        res.on('data', (chunk: Buffer) => {
          controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
          if ((controller.desiredSize ?? 0) <= 0) res.pause();
        });
        res.once('end', () => controller.close());
        res.once('error', (err) => controller.error(err));
      },
      cancel() {
        res.destroy();
      },
    },
    { highWaterMark: 0 },
  );
}

/** One server-sent event: its `event` field (null when absent) and its data lines joined by newlines. */
export interface SseEvent {
  event: string | null;
  data: string;
}

/**
 * Server-sent events from a response body, as the EventSource spec splits them (CR, LF or CRLF lines; `data`
 * lines joined; comments and other fields skipped; an event without its blank line at the end is dropped).
 * read() returns the events already received, one at a time; wait() resolves when more arrived or the body ended.
 */
export class SseReader {
  private buffer = '';
  private readonly events: SseEvent[] = [];
  private head = 0;
  private data: string[] = [];
  private event: string | null = null;
  private finished = false;
  private released = false;
  private failure: unknown = undefined;
  private wake: (() => void) | null = null;

  constructor(private readonly body: http.IncomingMessage) {
    body.setEncoding('utf8');
    body.on('data', (text: string) => {
      if (this.released) return;
      this.buffer += text;
      this.parse();
      this.notify();
    });
    body.once('end', () => {
      if (this.released) return;
      // A CR that ends the body ends its line: there is no LF to wait for.
      this.parse(true);
      this.finish(undefined);
    });
    body.once('error', (err) => this.finish(err));
    // A connection that closes before the body's end, without an error of its own.
    body.once('close', () => this.finish(body.complete ? undefined : new Error('the response body was cut off')));
  }

  /** The next event received, or undefined when there is none yet (see done / wait()). */
  read(): SseEvent | undefined {
    if (this.head === this.events.length) return undefined;
    const event = this.events[this.head++];
    if (this.head === this.events.length) {
      this.events.length = 0;
      this.head = 0;
    }
    return event;
  }

  /** True once the body ended and every event was read; throws what broke the body, if something did. */
  get done(): boolean {
    if (this.head < this.events.length || !this.finished) return false;
    if (this.failure !== undefined) throw this.failure;
    return true;
  }

  wait(): Promise<void> {
    if (this.head < this.events.length || this.finished) return Promise.resolve();
    return new Promise((resolve) => (this.wake = resolve));
  }

  /** Stops reading and closes the connection. */
  close(): void {
    this.body.destroy();
    this.finish(undefined);
  }

  /**
   * Stops reading, for a stream that has said all it will (`[DONE]`): the events not read yet and whatever else
   * arrives are dropped, and the body is left to end on its own, so that its keep-alive connection can serve the
   * next request. A body that has not ended within `graceMs` has its connection closed.
   */
  release(graceMs: number): void {
    this.released = true;
    this.events.length = 0;
    this.head = 0;
    this.finish(undefined);
    if (this.body.complete || this.body.destroyed) return;
    const timer = setTimeout(() => this.body.destroy(), graceMs);
    timer.unref();
    this.body.once('close', () => clearTimeout(timer));
  }

  private finish(err: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.failure = err;
    this.notify();
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  private parse(atEnd = false): void {
    const buffer = this.buffer;
    let start = 0;
    // Most servers end lines with LF alone: one search for CR per arrival, then only LFs.
    let lf = buffer.indexOf('\n');
    let cr = buffer.indexOf('\r');
    for (;;) {
      if (lf >= 0 && lf < start) lf = buffer.indexOf('\n', start);
      if (cr >= 0 && cr < start) cr = buffer.indexOf('\r', start);
      const end = cr < 0 || (lf >= 0 && lf < cr) ? lf : cr;
      if (end < 0) break;
      // A CR at the end of what arrived may be the first half of a CRLF: wait for the next byte.
      if (end === cr && end + 1 === buffer.length && !atEnd) break;
      this.line(buffer.slice(start, end));
      start = end + (end === cr && buffer.charCodeAt(end + 1) === 10 ? 2 : 1);
    }
    this.buffer = start === 0 ? buffer : buffer.slice(start);
  }

  private line(line: string): void {
    if (line.length === 0) {
      if (this.data.length > 0) this.events.push({ event: this.event, data: this.data.length === 1 ? (this.data[0] as string) : this.data.join('\n') });
      this.data = [];
      this.event = null;
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ':' starts a comment
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.event = value;
  }
}
