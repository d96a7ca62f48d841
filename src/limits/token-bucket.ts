import { TokenBucket } from 'limiter';

/** One kind of per-user bucket: how many units it holds and how fast it refills. */
export interface BucketPolicy {
  /** Units that drip in per interval (the rate; may be fractional). */
  readonly tokensPerInterval: number;
  /** Interval of the rate in ms (1000 for per second, 60000 for per minute). */
  readonly intervalMs: number;
  /** Most units the bucket holds: the burst. At least 1, or nothing could ever pass. */
  readonly capacity: number;
}

export function policy(ratePerInterval: number, intervalMs: number): BucketPolicy {
  if (!Number.isFinite(ratePerInterval) || ratePerInterval <= 0) throw new RangeError(`rate must be a positive number, got ${ratePerInterval}`);
  // The burst is the whole-unit part of the rate: 50/s lets 50 frames through at once, 0.5/s lets 1.
  return { tokensPerInterval: ratePerInterval, intervalMs, capacity: Math.max(1, Math.floor(ratePerInterval)) };
}

/** ms it takes to refill `units` at the policy's rate (not rounded). */
export function refillMs(p: BucketPolicy, units: number): number {
  return (units * p.intervalMs) / p.tokensPerInterval;
}

// Content within this of a whole number is snapped to it: drips in several
// steps can add up to an ulp less than one drip over the same time, and a
// client that waited exactly retryAfterMs must not be refused for 1e-16 of a
// token. Relative for large buckets (a billion tokens has ulps of ~1e-7).
const snapTolerance = (units: number) => Math.max(1e-9, Math.abs(units) * 1e-12);

// The wait estimates are a ms or two off at most; leastWait corrects them in at most this many steps each way.
const LEAST_WAIT_STEPS = 16;

/**
 * The `limiter` package's TokenBucket with two changes: time comes from an
 * injected clock (the library reads performance.now() itself, which tests
 * cannot drive), and a new bucket starts full (the library starts it empty,
 * which would refuse a user's very first frame). Only `drip()` is replaced;
 * taking tokens and the wait estimate stay the library's.
 */
export class ClockedBucket extends TokenBucket {
  private readonly now: () => number;

  constructor(p: BucketPolicy, now: () => number) {
    super({ bucketSize: p.capacity, tokensPerInterval: p.tokensPerInterval, interval: p.intervalMs });
    this.now = now;
    this.content = p.capacity;
    this.lastDrip = now();
  }

  override drip(): boolean {
    const now = this.now();
    const elapsedMs = Math.max(0, now - this.lastDrip);
    this.lastDrip = now;
    const before = this.content;
    // Multiply before dividing: 1000 ms * 60 / 60000 is exactly 1, 1000 * (60 / 60000) need not be.
    let content = Math.min(this.bucketSize, before + (elapsedMs * this.tokensPerInterval) / this.interval);
    const whole = Math.round(content);
    if (Math.abs(content - whole) < snapTolerance(whole)) content = whole;
    this.content = content;
    return Math.floor(content) > Math.floor(before);
  }

  /** Whole units that can be taken now (never negative, even while in debt). */
  remaining(): number {
    this.drip();
    return Math.max(0, Math.floor(this.content));
  }

  /** True when the bucket holds its whole capacity: it is then the same as a bucket never used. */
  isFull(): boolean {
    this.drip();
    return this.content >= this.bucketSize;
  }

  /** ms until the bucket is full again (0 when full), rounded up. */
  msUntilFull(): number {
    this.drip();
    return this.msUntil(this.bucketSize);
  }

  /**
   * ms until `count` units can be taken (0 when they can now): the least
   * whole ms after which drip() really holds them, so a retry after it
   * succeeds and one a ms earlier would not.
   */
  msUntilAvailable(count: number): number {
    // The library's estimate (it calls our drip()): ceil(deficit / rate).
    return this.leastWait(this.getWaitTime(count), count);
  }

  /**
   * ms until `remaining()` grows by one, rounded up. A full bucket gains
   * nothing by waiting, so there it is the time one unit takes to refill
   * after being taken: the pace at which a client may go on.
   */
  msUntilNextUnit(): number {
    this.drip();
    const target = Math.max(0, Math.floor(this.content)) + 1;
    return this.leastWait(Math.ceil(((target - this.content) * this.interval) / this.tokensPerInterval), target);
  }

  /** Puts `units` back (never past the capacity) or, with a negative count, takes them as debt. */
  adjust(units: number): void {
    this.drip();
    this.content = Math.min(this.bucketSize, this.content + units);
  }

  private msUntil(target: number): number {
    if (this.content >= target) return 0;
    return this.leastWait(Math.ceil(((target - this.content) * this.interval) / this.tokensPerInterval), target);
  }

  /**
   * Corrects an estimate to the least whole ms after which one drip reaches `target` (division by a rounded
   * rate can be 1 ms off either way). The correction takes a few steps at most: past 2^53 ms a step of 1 no
   * longer changes the number, so an unbounded walk would never end (a debt that large is refused at settle,
   * but a wait must never hang the event loop).
   */
  private leastWait(estimateMs: number, target: number): number {
    const reaches = (ms: number) => this.content + (ms * this.tokensPerInterval) / this.interval >= target - snapTolerance(target);
    let wait = Math.max(0, estimateMs);
    if (!Number.isSafeInteger(wait)) return Number.isFinite(wait) ? Math.ceil(wait) : Number.MAX_SAFE_INTEGER;
    for (let step = 0; step < LEAST_WAIT_STEPS && wait > 0 && reaches(wait - 1); step++) wait -= 1;
    for (let step = 0; step < LEAST_WAIT_STEPS && !reaches(wait); step++) wait += 1;
    return wait;
  }
}
