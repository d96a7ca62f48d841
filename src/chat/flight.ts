import type { ModelResult } from '../llm/provider.js';
import type { AppError } from '../protocol/index.js';

export type FlightOutcome = { kind: 'end'; result: ModelResult | null; cancelled: boolean } | { kind: 'error'; error: AppError };

export interface FlightListener {
  /** A worker has started the call (told at once to a listener that attaches after). */
  onStart(): void;
  /** `replayed` is true for chunks the flight had before this listener attached. */
  onChunk(text: string, replayed: boolean): void;
  onOutcome(outcome: FlightOutcome): void;
}

/**
 * One model call (or one cache replay) and everyone listening to it. Identical
 * chats in flight share one Flight (single-flight): a listener that joins late
 * gets the chunks so far, then the live ones. The call is cancelled only when
 * its last holder lets go, so one subscriber cancelling leaves the rest streaming.
 */
export class Flight {
  readonly chunks: string[] = [];
  outcome: FlightOutcome | null = null;
  startedAt: number | null = null;
  private readonly listeners = new Set<FlightListener>();
  /** Holders: listeners plus chats that reserved a place before their ack commit. */
  private holders = 0;
  private cancelCall: (() => void) | null = null;

  constructor(
    readonly key: string | null,
    private readonly onSettled: (flight: Flight) => void,
  ) {}

  get ended(): boolean {
    return this.outcome !== null;
  }

  /** False once it ended or its last holder let go: a call being stopped must not pick up new chats. */
  get joinable(): boolean {
    return !this.ended && this.holders > 0;
  }

  /** Keeps the call alive for a chat that will attach after its commit. */
  hold(): void {
    this.holders++;
  }

  /** Lets go of a hold taken with hold() (e.g. the commit failed) or of an attached listener. */
  letGo(listener?: FlightListener): void {
    if (listener) this.listeners.delete(listener);
    this.holders--;
    if (this.holders <= 0 && !this.ended) this.cancelCall?.();
  }

  /** Attaches a listener (that already holds): replays what the flight has, then streams live. */
  attach(listener: FlightListener): void {
    if (this.startedAt !== null) listener.onStart();
    for (const chunk of this.chunks) listener.onChunk(chunk, true);
    if (this.outcome) {
      listener.onOutcome(this.outcome);
      return;
    }
    this.listeners.add(listener);
  }

  setCancel(cancel: () => void): void {
    this.cancelCall = cancel;
  }

  started(): void {
    if (this.startedAt !== null || this.ended) return;
    this.startedAt = performance.now();
    for (const l of this.listeners) l.onStart();
  }

  chunk(text: string): void {
    if (this.ended) return;
    this.chunks.push(text);
    for (const l of this.listeners) l.onChunk(text, false);
  }

  settle(outcome: FlightOutcome): void {
    if (this.ended) return;
    this.outcome = outcome;
    const listeners = [...this.listeners];
    this.listeners.clear();
    this.onSettled(this);
    for (const l of listeners) l.onOutcome(outcome);
  }
}
