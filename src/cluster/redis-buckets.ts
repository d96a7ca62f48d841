/**
 * Per-user chat and model-token buckets shared by every node: the buckets of src/limits/rate-limits.ts (the same
 * refill, burst, retryAfterMs and reserve → settle / release), kept in Redis and charged by one Lua script per
 * operation, so that a check and its charge are one step however many nodes ask at once.
 *
 * Time is Redis's (TIME), so the nodes' clocks do not matter. A bucket is a hash {c: content, t: last drip}; a
 * missing one is full, and each key expires when its bucket is full again, so Redis holds only users who are
 * spending. While Redis is down, or when a command fails, the node's own RateLimits decide: chats keep flowing and
 * each node limits alone until Redis answers again.
 */
import type { RateLimitInfo } from '../protocol/index.js';
import type { RateLimits } from '../limits/rate-limits.js';
import { policy, type BucketPolicy } from '../limits/token-bucket.js';
import type { AsyncChatLimits, LimitDecision, Refusal } from './ports.js';
import type { RedisHub } from './redis.js';
import { downReason, failureReason, LUA_NOW_MS, redisScript, type FallbackHook } from './scripts.js';

/**
 * The ClockedBucket of src/limits/token-bucket.ts in Lua: drip (with its snap to whole units), the least whole wait
 * (leastWait) and ms until full. ARGV[1..3]: rate per interval, interval ms, capacity. Lua numbers are doubles like
 * JavaScript's, and the content is stored with 17 significant digits, so the figures are the embedded ones.
 */
const BUCKET_LUA = `
local rate, interval, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = ${LUA_NOW_MS}
local state = redis.call('HMGET', KEYS[1], 'c', 't')
local c = tonumber(state[1]) or cap
local last = tonumber(state[2]) or now

local function tolerance(units) return math.max(1e-9, math.abs(units) * 1e-12) end

c = math.min(cap, c + (math.max(0, now - last) * rate) / interval)
local whole = math.floor(c + 0.5)
if math.abs(c - whole) < tolerance(whole) then c = whole end

local function least_wait(estimate, target)
  local function reaches(ms) return c + (ms * rate) / interval >= target - tolerance(target) end
  local wait = math.max(0, estimate)
  if wait >= 9007199254740991 then return 9007199254740991 end
  for _ = 1, 16 do
    if wait > 0 and reaches(wait - 1) then wait = wait - 1 else break end
  end
  for _ = 1, 16 do
    if reaches(wait) then break end
    wait = wait + 1
  end
  return wait
end

local function ms_until_full()
  if c >= cap then return 0 end
  return least_wait(math.ceil(((cap - c) * interval) / rate), cap)
end

local function remaining() return math.max(0, math.floor(c)) end

-- A full bucket is no key; any other expires when it is full again, when it would read as full anyway.
local function save(reset_ms)
  if c >= cap then
    redis.call('DEL', KEYS[1])
    return
  end
  redis.call('HSET', KEYS[1], 'c', string.format('%.17g', c), 't', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], math.max(1, reset_ms))
end
`;

/** Takes ARGV[4] units: {1, remaining, resetMs} or {0, remaining, resetMs, retryAfterMs}. */
const takeScript = redisScript(`${BUCKET_LUA}
local count = tonumber(ARGV[4])
if count <= cap and count <= c then
  c = c - count
  local reset_ms = ms_until_full()
  save(reset_ms)
  return {1, remaining(), reset_ms}
end
local estimate = 0
if count > c then estimate = math.ceil((count - c) / (rate / interval)) end
return {0, remaining(), ms_until_full(), least_wait(estimate, count)}
`);

/** Puts ARGV[4] units back (never past the capacity) or, when negative, takes them as debt. */
const adjustScript = redisScript(`${BUCKET_LUA}
c = math.min(cap, c + tonumber(ARGV[4]))
save(ms_until_full())
return 1
`);

export type SharedBucketName = 'chats' | 'tokens';

/** A token reservation: its settle and release resolve once the bucket has them (never reject). */
export interface SharedReservation {
  readonly reserved: number;
  settle(usedTokens: number): Promise<void>;
  release(): Promise<void>;
}

export type SharedReserveResult = { ok: true; reservation: SharedReservation; info: RateLimitInfo } | Refusal;

export interface SharedChatLimits extends AsyncChatLimits {
  chat(userId: string): Promise<LimitDecision>;
  reserveModelTokens(userId: string, maxTokens: number): Promise<SharedReserveResult>;
}

export interface RedisChatLimitsOptions {
  hub: RedisHub;
  /** The node's own limits: they decide while Redis cannot. */
  local: RateLimits;
  /** The same settings as `local`'s. */
  chatsPerMinute: number;
  modelTokensPerMinute: number;
  /** Every refusal, by bucket (as createChatLimits counts them). */
  refused?: (bucket: string) => void;
  onFallback?: FallbackHook;
}

const PART = 'buckets';

/** The chats and model-token buckets of every node, in Redis; the node's own limits while Redis cannot answer. */
export function createRedisChatLimits(options: RedisChatLimitsOptions): SharedChatLimits {
  const { hub, local } = options;
  const refused = options.refused ?? (() => {});
  const onFallback = options.onFallback ?? (() => {});
  const policies: Record<SharedBucketName, BucketPolicy> = {
    chats: policy(options.chatsPerMinute, 60_000),
    tokens: policy(options.modelTokensPerMinute, 60_000),
  };
  const keyOf = (name: SharedBucketName, userId: string) => hub.key(`bucket:${name}:${userId}`);
  const argsOf = (name: SharedBucketName, units: number) => {
    const p = policies[name];
    return [p.tokensPerInterval, p.intervalMs, p.capacity, units];
  };

  /** The decision of `viaRedis`, or of `locally` while Redis cannot answer. */
  async function decide<T>(viaRedis: () => Promise<T>, locally: () => T): Promise<T> {
    if (!hub.up) {
      onFallback(downReason(PART));
      return locally();
    }
    try {
      return await viaRedis();
    } catch (err) {
      onFallback(failureReason(PART, err));
      return locally();
    }
  }

  async function take(userId: string, name: SharedBucketName, count: number): Promise<LimitDecision> {
    const reply = (await takeScript(hub.command, [keyOf(name, userId)], argsOf(name, count))) as number[];
    const [ok, remaining, resetMs, retryAfterMs] = reply.map(Number);
    const info = { limit: policies[name].capacity, remaining: remaining!, resetMs: resetMs! };
    return ok === 1 ? { ok: true, info } : { ok: false, bucket: name, retryAfterMs: retryAfterMs!, info };
  }

  /** Gives `units` back to (or takes them as debt from) a bucket; a failure leaves the bucket to refill on its own. */
  async function adjust(userId: string, units: number): Promise<void> {
    if (units === 0) return;
    if (!hub.up) return onFallback(downReason(PART));
    try {
      await adjustScript(hub.command, [keyOf('tokens', userId)], argsOf('tokens', units));
    } catch (err) {
      onFallback(failureReason(PART, err));
    }
  }

  function sharedReservation(userId: string, amount: number, maxTokens: number): SharedReservation {
    let open = true;
    const finish = (used: number) => {
      if (!open) return Promise.resolve();
      open = false;
      return adjust(userId, amount - used);
    };
    return {
      reserved: amount,
      // The clamps of the embedded reservation: a broken usage report is the whole reservation, one past maxTokens is maxTokens.
      settle: (usedTokens) => finish(Number.isFinite(usedTokens) && usedTokens >= 0 ? Math.min(usedTokens, maxTokens) : amount),
      release: () => finish(0),
    };
  }

  return {
    async chat(userId) {
      const d = await decide(
        () => take(userId, 'chats', 1),
        () => local.chat(userId),
      );
      if (!d.ok) refused(d.bucket);
      return d;
    },
    async reserveModelTokens(userId, maxTokens) {
      if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new RangeError(`maxTokens must be an integer >= 1, got ${maxTokens}`);
      const amount = Math.min(maxTokens, policies.tokens.capacity);
      const d = await decide<SharedReserveResult>(
        async () => {
          const d = await take(userId, 'tokens', amount);
          return d.ok ? { ok: true, reservation: sharedReservation(userId, amount, maxTokens), info: d.info } : d;
        },
        () => {
          const d = local.reserveModelTokens(userId, maxTokens);
          if (!d.ok) return d;
          const { reservation } = d;
          // Made in the node's own bucket: settled there too, whatever Redis does meanwhile.
          const settledLocally: SharedReservation = {
            reserved: reservation.reserved,
            settle: async (usedTokens) => reservation.settle(usedTokens),
            release: async () => reservation.release(),
          };
          return { ok: true, reservation: settledLocally, info: d.info };
        },
      );
      if (!d.ok) refused(d.bucket);
      return d;
    },
  };
}
