import { AppError } from '../protocol/index.js';
import type { ModelRequest } from './provider.js';
import type { ModelRun, ModelRunHandlers, PoolSlot } from './pool.js';
import { FairQueue } from './fair-queue.js';

// What a call is taken to hold a slot for until one has been timed: only used to estimate a retry.
const INITIAL_SERVICE_MS = 1000;
// Weight of the newest call in the moving average of how long a call holds its slot.
const SERVICE_MS_WEIGHT = 0.2;

export interface SlotLedgerOptions {
  /** Calls running at once. */
  slots: number;
  /** Calls allowed to wait for a slot beyond those running; past it, reserve() refuses with `overloaded`. */
  maxQueue: number;
  /** Calls of one owner allowed to wait; past it, reserve() refuses that owner with `rate_limited`. */
  maxQueuedPerOwner?: number | undefined;
  /** Caps the retry estimate. */
  taskTimeoutMs: number;
  onOwnerQueueFull?: (() => void) | undefined;
}

/** A place reserve() gave: run() when the call is queued, release() when it ends (or is never run). */
export interface Place {
  run(): void;
  release(): void;
}

/**
 * The admission both model pools share (the worker pool and the main-thread pool of a provider object): places up
 * to slots + maxQueue, each owner's share of the waiting ones, and the round-robin line they wait in.
 */
export class SlotLedger<T> {
  /** Calls waiting for a slot, one line per owner, served round-robin. */
  readonly waiting = new FairQueue<T>();
  readonly capacity: number;
  private readonly maxQueuedPerOwner: number;
  /** Places reserve() gave that run() has not queued yet: they count as waiting for their owner. */
  private readonly reservedBy = new Map<string, number>();
  private held = 0;
  private serviceMs = INITIAL_SERVICE_MS;

  constructor(private readonly options: SlotLedgerOptions) {
    this.capacity = options.slots + options.maxQueue;
    this.maxQueuedPerOwner = options.maxQueuedPerOwner ?? Infinity;
    if (!(this.maxQueuedPerOwner >= 1)) throw new RangeError(`maxQueuedPerOwner must be >= 1, got ${this.maxQueuedPerOwner}`);
  }

  /** Places given and not yet released: what capacity bounds. */
  get inFlight(): number {
    return this.held;
  }

  /** A call held its slot `ms`: feeds the estimate an owner whose share is full is told to wait. */
  timed(ms: number): void {
    this.serviceMs += (ms - this.serviceMs) * SERVICE_MS_WEIGHT;
  }

  /** A pool's slot for `owner` over reserve(): run() starts the call with `start`, which must call `release` when it ends. */
  slot(owner: string, closed: boolean, start: (request: ModelRequest, handlers: ModelRunHandlers, release: () => void) => ModelRun): PoolSlot {
    const place = this.reserve(owner, closed);
    return {
      run: (request, handlers) => {
        place.run();
        return start(request, handlers, place.release);
      },
      release: place.release,
    };
  }

  /** Throws `rate_limited` (with retryAfterMs) when the owner's share is full, `overloaded` when the pool is full or closed. */
  reserve(owner: string, closed: boolean): Place {
    const queuedOfOwner = this.waiting.count(owner) + (this.reservedBy.get(owner) ?? 0);
    if (queuedOfOwner >= this.maxQueuedPerOwner) {
      this.options.onOwnerQueueFull?.();
      // Its oldest waiting call is served within one turn of the ring: one call of each owner waiting, at the
      // rate the slots free up.
      const retryAfterMs = Math.min(this.options.taskTimeoutMs, Math.max(1, Math.ceil((this.waiting.owners * this.serviceMs) / this.options.slots)));
      throw new AppError(
        'rate_limited',
        `${queuedOfOwner} of your chats are waiting for a worker (at most ${this.maxQueuedPerOwner}); retry in ${retryAfterMs} ms`,
        { retryAfterMs },
      );
    }
    if (closed || this.held >= this.capacity) throw new AppError('overloaded', 'the model queue is full; retry shortly');
    this.held++;
    this.reservedBy.set(owner, (this.reservedBy.get(owner) ?? 0) + 1);
    let state: 'reserved' | 'running' | 'released' = 'reserved';
    const unreserve = () => {
      const n = (this.reservedBy.get(owner) ?? 1) - 1;
      if (n > 0) this.reservedBy.set(owner, n);
      else this.reservedBy.delete(owner);
    };
    return {
      run: () => {
        if (state !== 'reserved') throw new Error(`pool slot is ${state}`);
        state = 'running';
        unreserve();
      },
      release: () => {
        if (state === 'released') return;
        if (state === 'reserved') unreserve();
        state = 'released';
        this.held--;
      },
    };
  }
}
