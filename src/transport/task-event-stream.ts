import type { HttpResponse } from 'uWebSockets.js';
import type { Identity } from '../auth/identity.js';
import type { Sink, Subscription, TaskTerminal } from '../chat/task.js';
import type { ChatDelta, ServerMessage } from '../protocol/index.js';
import type { TransportDeps } from './deps.js';
import type { Responder } from './http-io.js';
import { replayBytes } from './session.js';

/** How a stream writes its task as Server-Sent Events: chatwire's own events, or another client's (the AI SDK's). */
export interface SseEncoding {
  /** Written right after the head. */
  readonly opening: string;
  /** The events of one delta, or of the chat.done / chat.error after which the stream ends. */
  events(message: ChatDelta | TaskTerminal): string;
}

/**
 * One task's Server-Sent Events stream, as its encoding writes it: the deltas, then the chat.done or chat.error,
 * after which the stream ends. A reader that does not keep up is never buffered for: while the response is backed
 * up the deltas wait in the task (which keeps them anyway) and the next write waits for the drain. It holds one of
 * the user's connection slots until it ends. A client that goes away ends the stream, never the task.
 */
export class TaskEventStream {
  private started = false;
  private backedUp = false;
  private ended = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private subscription: Subscription | null = null;

  constructor(
    private readonly res: HttpResponse,
    private readonly responder: Responder,
    private readonly streams: Set<{ end(): void }>,
    private readonly releaseSlot: () => void,
    private readonly encoding: SseEncoding,
  ) {}

  readonly sink: Sink = {
    // Nothing goes out before the head: a pump that runs while the subscription is being made waits for start().
    congested: () => !this.started || this.backedUp || !this.responder.open,
    deliver: (m: ServerMessage) => {
      if (!this.responder.open || this.ended) return false;
      if (m.type === 'chat.delta') this.write(this.encoding.events(m));
      else if (m.type === 'chat.done' || m.type === 'chat.error') {
        this.write(this.encoding.events(m));
        setImmediate(this.end);
      }
      return true;
    },
  };

  /** Subscribes to the task from `fromSeq` and charges the replay; on a refusal nothing is left held. */
  async subscribe(chat: TransportDeps['chat'], caller: Identity, taskId: string, fromSeq: number, charge: (replay: number) => void): Promise<void> {
    try {
      this.subscription = await chat.subscribe(caller, taskId, fromSeq, this.sink);
      charge(replayBytes(this.subscription.task, fromSeq));
    } catch (err) {
      this.subscription?.close();
      this.releaseSlot();
      throw err;
    }
  }

  /** Writes the head and starts streaming; a client that went away meanwhile only ends the stream. */
  start(headers: Record<string, string>): void {
    if (!this.responder.open) {
      this.end();
      return;
    }
    const res = this.res;
    res.cork(() => {
      res.writeStatus('200 OK');
      for (const [k, v] of Object.entries(headers)) res.writeHeader(k, v);
      res.write(this.encoding.opening);
    });
    this.started = true;
    // Keeps proxies from timing the stream out while the model is quiet.
    this.heartbeat = setInterval(() => {
      if (this.responder.open && !this.backedUp) this.write(': keep-alive\n\n');
    }, 15_000);
    this.heartbeat.unref();
    this.streams.add(this);
    this.responder.onAbort(this.end);
    this.subscription?.pump();
  }

  private write(chunk: string): boolean {
    let ok = true;
    this.res.cork(() => {
      ok = this.res.write(chunk);
    });
    if (!ok && !this.backedUp) {
      this.backedUp = true;
      this.res.onWritable(() => {
        this.backedUp = false;
        this.subscription?.pump();
        return true;
      });
    }
    return true;
  }

  readonly end = (): void => {
    if (this.ended) return;
    this.ended = true;
    this.releaseSlot();
    clearInterval(this.heartbeat);
    this.streams.delete(this);
    this.subscription?.close();
    if (this.responder.open) {
      this.responder.done = true;
      this.res.cork(() => this.res.end());
    }
  };
}
