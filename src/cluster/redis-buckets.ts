/**
 * Per-user chat and model-token buckets shared by every node: the buckets of src/limits/rate-limits.ts (the same
 * refill, burst, retryAfterMs and reserve → settle / release), kept in Redis and charged by one Lua script per
 * operation, so that a check and its charge are one step however many nodes ask at once. A send's two checks (its
 * model tokens, then its chat) are one script: one round trip on the ack's path.
 *
 * Time is Redis's (TIME), so the nodes' clocks do not matter. A bucket is a hash {c: content, t: last drip}; a
 * missing one is full, and each key expires when its bucket is full again, so Redis holds only users who are
 * spending. While Redis is down, or when a command fails, the node's own RateLimits decide: chats keep flowing and
 * each node limits alone until Redis answers again.
 */
import type { RateLimitInfo } from '../protocol/index.js';
import type { Admission } from '../chat/ports.js';
import { admitLocally } from '../limits/chat-limits.js';
import type { RateLimits } from '../limits/rate-limits.js';
import { policy, type BucketPolicy } from '../limits/token-bucket.js';
import type { AsyncChatLimits, LimitDecision, Refusal } from './ports.js';
import type { RedisHub } from './redis.js';
import { downReason, failureReason, LUA_NOW_MS, redisScript, type FallbackHook } from './scripts.js';

/**
 * The ClockedBucket of src/limits/token-bucket.ts in Lua: drip (with its snap to whole units), the least whole wait
 * (leastWait) and ms until full, over a bucket read by `open(key, rate per interval, interval ms, capacity)`. Lua
 * numbers are doubles like JavaScript's, and the content is stored with 17 significant digits, so the figures are
 * the embedded ones.
 */
const BUCKET_LUA = `
local t = redis.call('TIME')
local now = ${LUA_NOW_MS}

local function tolerance(units) return math.max(1e-9, math.abs(units) * 1e-12) end

local function open(key, rate, interval, cap)
  local state = redis.call('HMGET', key, 'c', 't')
  local c = tonumber(state[1]) or cap
  local last = tonumber(state[2]) or now
  c = math.min(cap, c + (math.max(0, now - last) * rate) / interval)
  local whole = math.floor(c + 0.5)
  if math.abs(c - whole) < tolerance(whole) then c = whole end
  return {key = key, rate = rate, interval = interval, cap = cap, c = c}
end

local function least_wait(b, estimate, target)
  local function reaches(ms) return b.c + (ms * b.rate) / b.interval >= target - tolerance(target) end
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

local function ms_until_full(b)
  if b.c >= b.cap then return 0 end
  return least_wait(b, math.ceil(((b.cap - b.c) * b.interval) / b.rate), b.cap)
end

local function remaining(b) return math.max(0, math.floor(b.c)) end

-- A full bucket is no key; any other expires when it is full again, when it would read as full anyway.
local function save(b)
  local reset_ms = ms_until_full(b)
  if b.c >= b.cap then
    redis.call('DEL', b.key)
  else
    redis.call('HSET', b.key, 'c', string.format('%.17g', b.c), 't', string.format('%.17g', now))
    redis.call('PEXPIRE', b.key, math.max(1, reset_ms))
  end
  return reset_ms
end

-- Takes count units: {1, remaining, resetMs} or {0, remaining, resetMs, retryAfterMs}.
local function take(b, count)
  if count <= b.cap and count <= b.c then
    b.c = b.c - count
    local reset_ms = save(b)
    return {1, remaining(b), reset_ms}
  end
  local estimate = 0
  if count > b.c then estimate = math.ceil((count - b.c) / (b.rate / b.interval)) end
  return {0, remaining(b), ms_until_full(b), least_wait(b, estimate, count)}
end

-- Puts units back (never past the capacity) or, when negative, takes them as debt.
local function adjust(b, units)
  b.c = math.min(b.cap, b.c + units)
  save(b)
end
`;

/** KEYS[1] the bucket. ARGV rate per interval, interval ms, capacity, units: take's answer. */
const takeScript = redisScript(`${BUCKET_LUA}
return take(open(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])), tonumber(ARGV[4]))
`);

/** KEYS[1] the bucket. ARGV rate per interval, interval ms, capacity, units: adjust. */
const adjustScript = redisScript(`${BUCKET_LUA}
adjust(open(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])), tonumber(ARGV[4]))
return 1
`);

/**
 * The checks of one send in one step: ARGV[4] model tokens (none when 0) from KEYS[1], then one chat from KEYS[2];
 * a refused chat puts the tokens back. ARGV[1..3] and ARGV[5..7]: the two buckets' rate, interval and capacity.
 * Returns {'ok', the chat's take answer} or {the refusing bucket's name, its take answer}.
 */
const admitScript = redisScript(`${BUCKET_LUA}
local amount = tonumber(ARGV[4])
local tokens = nil
if amount > 0 then
  tokens = open(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
  local taken = take(tokens, amount)
  if taken[1] == 0 then return {'tokens', taken} end
end
local taken = take(open(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])), 1)
if taken[1] == 0 then
  if tokens then adjust(tokens, amount) end
  return {'chats', taken}
end
return {'ok', taken}
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
  const policyArgs = (name: SharedBucketName) => {
    const p = policies[name];
    return [p.tokensPerInterval, p.intervalMs, p.capacity];
  };
  const argsOf = (name: SharedBucketName, units: number) => [...policyArgs(name), units];

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

  /** The decision in a take answer of the Lua script of bucket `name`. */
  function decisionOf(name: SharedBucketName, reply: unknown[]): LimitDecision {
    const [ok, remaining, resetMs, retryAfterMs] = reply.map(Number);
    const info = { limit: policies[name].capacity, remaining: remaining!, resetMs: resetMs! };
    return ok === 1 ? { ok: true, info } : { ok: false, bucket: name, retryAfterMs: retryAfterMs!, info };
  }

  async function take(userId: string, name: SharedBucketName, count: number): Promise<LimitDecision> {
    return decisionOf(name, (await takeScript(hub.command, [keyOf(name, userId)], argsOf(name, count))) as unknown[]);
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

  /** The model tokens a reservation of `maxTokens` takes: more than the bucket holds is taken as a full bucket. */
  function amountOf(maxTokens: number): number {
    if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new RangeError(`maxTokens must be an integer >= 1, got ${maxTokens}`);
    return Math.min(maxTokens, policies.tokens.capacity);
  }

  return {
    async admit(userId, maxTokens) {
      const amount = maxTokens === null ? 0 : amountOf(maxTokens);
      return decide<Admission>(
        async () => {
          const keys = [keyOf('tokens', userId), keyOf('chats', userId)];
          const [verdict, taken] = (await admitScript(hub.command, keys, [...argsOf('tokens', amount), ...policyArgs('chats')])) as [string, unknown[]];
          const d = decisionOf(verdict === 'tokens' ? 'tokens' : 'chats', taken);
          if (!d.ok) {
            refused(d.bucket);
            return d;
          }
          return { ok: true, reservation: maxTokens === null ? null : sharedReservation(userId, amount, maxTokens), info: d.info };
        },
        () => admitLocally(local, refused, userId, maxTokens),
      );
    },
    async chat(userId) {
      const d = await decide(
        () => take(userId, 'chats', 1),
        () => local.chat(userId),
      );
      if (!d.ok) refused(d.bucket);
      return d;
    },
    async reserveModelTokens(userId, maxTokens) {
      const amount = amountOf(maxTokens);
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
