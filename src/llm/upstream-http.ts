import { StringDecoder } from 'node:string_decoder';
import { Client, type Dispatcher } from 'undici';

/**
 * The HTTP client of the openai provider: undici's HTTP/1.1 client, a pool of keep-alive connections to the
 * upstream's origin (one undici Client each, see pick()), driven through undici's dispatch handler. The response reaches the provider as callbacks on the bytes undici
 * parsed off the socket: no web streams, no Node stream, no promise per chunk, and no SDK between the socket and
 * the SSE parser. Measured on a fake upstream (docs/relay.md), that is what most of a relayed token's CPU went to.
 */
export interface UpstreamHttp {
  /** Sends one request; `sink` hears its response as it arrives. The returned function aborts it (closing its connection). */
  send(request: UpstreamRequest, sink: ResponseSink): (reason: Error) => void;
  close(): Promise<void>;
}

export interface UpstreamRequest {
  method: 'GET' | 'POST';
  /** Path and query, joined to the base URL's path. */
  path: string;
  headers: Record<string, string>;
  body?: string;
}

/** A response's header values by lower-case name, as undici parsed them. */
export type ResponseHeaders = Record<string, string | string[] | undefined>;

/** What a request's response tells its sender, in order: head, data..., then exactly one of end or error. */
export interface ResponseSink {
  head(status: number, headers: ResponseHeaders): void;
  data(chunk: Buffer): void;
  end(): void;
  error(err: Error): void;
}

// Free connections are closed after this long (or the server's own `Keep-Alive: timeout` less a second, if
// shorter): reusing one that the server is about to close would fail the request. undici's default too.
const IDLE_CONNECTION_MS = 4000;

export function createUpstreamHttp(baseUrl: string): UpstreamHttp {
  const base = new URL(baseUrl);
  if (base.protocol !== 'http:' && base.protocol !== 'https:') throw new TypeError(`unsupported protocol ${base.protocol}`);
  const basePath = base.pathname.replace(/\/+$/, '');
  const clientOptions: Client.Options = {
    keepAliveTimeout: IDLE_CONNECTION_MS,
    // The provider's own first-token and idle timeouts govern a call: undici's would cut a slow model's stream.
    headersTimeout: 0,
    bodyTimeout: 0,
  };
  // One undici Client per connection, and a request goes to one with nothing in flight. undici's Pool would do the
  // same, except for a connection whose response just ended: it counts that one busy for a turn of the event loop more
  // (undici's guard against servers that close a kept-alive connection), so a call that starts as the previous one
  // ends opened a connection of its own. A Client handed a request in that turn sends it once the turn is over, on
  // the same connection. The Clients are at most the calls in flight at once (the worker's bounded share).
  const connections: Array<{ client: Client; inFlight: number }> = [];
  function pick(): { client: Client; inFlight: number } {
    for (const connection of connections) if (connection.inFlight === 0) return connection;
    const connection = { client: new Client(base.origin, clientOptions), inFlight: 0 };
    connections.push(connection);
    return connection;
  }

  function send(request: UpstreamRequest, sink: ResponseSink): (reason: Error) => void {
    const headers = request.headers;
    // A length instead of chunked encoding, which some servers refuse.
    if (request.body !== undefined) headers['content-length'] = String(Buffer.byteLength(request.body));
    // undici does not decode compressed bodies on this path.
    headers['accept-encoding'] = 'identity';
    let controller: Dispatcher.DispatchController | null = null;
    let abortedWith: Error | null = null;
    let settled = false;
    const connection = pick();
    connection.inFlight++;
    // undici is done with the request: its connection may take the next one.
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      connection.inFlight--;
    };
    const handler: Dispatcher.DispatchHandler = {
      onRequestStart(c) {
        controller = c;
        // Aborted while it waited for a connection: it is never sent.
        if (abortedWith) c.abort(abortedWith);
      },
      onResponseStart(_c, status, responseHeaders) {
        if (!settled) sink.head(status, responseHeaders as ResponseHeaders);
      },
      onResponseData(_c, chunk) {
        if (!settled) sink.data(chunk);
      },
      onResponseEnd() {
        release();
        if (settled) return;
        settled = true;
        sink.end();
      },
      onResponseError(_c, err) {
        release();
        if (settled) return;
        settled = true;
        sink.error(err);
      },
    };
    // Non-idempotent: undici does not retry it on its own (retries are the provider's, before the first token only).
    connection.client.dispatch(
      { origin: base.origin, method: request.method, path: basePath + request.path, headers, body: request.body ?? null, idempotent: false },
      handler,
    );
    return (reason) => {
      if (abortedWith) return;
      abortedWith = reason;
      controller?.abort(reason);
      // Before undici picked it up there is no controller: the sender hears of the abort now, undici when it starts.
      if (!settled) {
        settled = true;
        sink.error(reason);
      }
    };
  }

  return {
    send,
    close: async () => {
      await Promise.all(connections.map((c) => c.client.close()));
    },
  };
}

/** One server-sent event: its `event` field (null when absent) and its data lines joined by newlines. */
export interface SseEvent {
  event: string | null;
  data: string;
}

/**
 * Server-sent events from a response body's bytes, as the EventSource spec splits them (CR, LF or CRLF lines;
 * `data` lines joined; comments and other fields skipped). Each complete event goes to `onEvent` as it is parsed,
 * in the call to write() that completed it. An event without its blank line when the body ends is dropped.
 */
export class SseParser {
  private readonly decoder = new StringDecoder('utf8');
  private buffer = '';
  private data: string[] = [];
  private event: string | null = null;
  private stopped = false;

  constructor(private readonly onEvent: (event: string | null, data: string) => void) {}

  write(chunk: Buffer): void {
    if (this.stopped) return;
    this.buffer += this.decoder.write(chunk);
    this.parse(false);
  }

  /** The body ended: a CR that ends it ends its line (there is no LF to wait for). */
  end(): void {
    if (this.stopped) return;
    this.buffer += this.decoder.end();
    this.parse(true);
  }

  /** No more events: what arrives from now on is dropped (after `[DONE]`, or once the reading failed). */
  stop(): void {
    this.stopped = true;
    this.buffer = '';
  }

  private parse(atEnd: boolean): void {
    const buffer = this.buffer;
    let start = 0;
    // Most servers end lines with LF alone: one search for CR per arrival, then only LFs.
    let lf = buffer.indexOf('\n');
    let cr = buffer.indexOf('\r');
    while (!this.stopped) {
      if (lf >= 0 && lf < start) lf = buffer.indexOf('\n', start);
      if (cr >= 0 && cr < start) cr = buffer.indexOf('\r', start);
      const end = cr < 0 || (lf >= 0 && lf < cr) ? lf : cr;
      if (end < 0) break;
      // A CR at the end of what arrived may be the first half of a CRLF: wait for the next byte.
      if (end === cr && end + 1 === buffer.length && !atEnd) break;
      this.line(buffer, start, end);
      start = end + (end === cr && buffer.charCodeAt(end + 1) === 10 ? 2 : 1);
    }
    if (this.stopped) return;
    this.buffer = start === 0 ? buffer : buffer.slice(start);
  }

  private line(buffer: string, start: number, end: number): void {
    if (start === end) {
      if (this.data.length > 0) {
        const data = this.data.length === 1 ? (this.data[0] as string) : this.data.join('\n');
        const event = this.event;
        this.data = [];
        this.event = null;
        this.onEvent(event, data);
        return;
      }
      this.event = null;
      return;
    }
    if (buffer.charCodeAt(start) === 58) return; // ':' starts a comment
    // `data: ` first: nearly every line of a chat stream is one, and it is read without slicing the field name.
    if (buffer.startsWith('data:', start)) {
      this.data.push(buffer.slice(start + (buffer.charCodeAt(start + 5) === 32 ? 6 : 5), end));
      return;
    }
    const colon = buffer.indexOf(':', start);
    const fieldEnd = colon < 0 || colon > end ? end : colon;
    const field = buffer.slice(start, fieldEnd);
    let valueStart = fieldEnd === end ? end : fieldEnd + 1;
    if (buffer.charCodeAt(valueStart) === 32 && valueStart < end) valueStart++;
    if (field === 'data') this.data.push(buffer.slice(valueStart, end));
    else if (field === 'event') this.event = buffer.slice(valueStart, end);
  }
}
