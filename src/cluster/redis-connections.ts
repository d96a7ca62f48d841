/**
 * The per-user connection cap across nodes. Each node counts its own open connections per user in a hash of its
 * own (`conns:<nodeId>`: user → count), and the cap is checked against the sum over the live nodes.
 *
 * A node that dies stops counting: its liveness is its entry in one sorted set (`conn-nodes`: node id → the Redis
 * time at which it lapses), which the node pushes forward every third of `nodeTtlMs`, and its hash expires at the
 * same time. The open script ignores, and removes, nodes past their time. (One sorted set rather than one key per
 * node: the script then names the keys it reads to find the nodes.) The other nodes' hashes are read by name inside
 * the script: chatwire runs on one Redis server, not a Redis Cluster.
 *
 * While Redis is down, or after one of this node's commands failed, the node's own cap (RateLimits) decides, and
 * the node's hash in Redis may be out of date. Once Redis answers again the node registers its current counts
 * afresh (one script that replaces its hash), and from then on counts in Redis again.
 */
import type { ConnectionAdmission } from '../limits/chat-limits.js';
import type { RateLimits } from '../limits/rate-limits.js';
import { AppError } from '../protocol/index.js';
import type { RedisHub } from './redis.js';
import { downReason, failureReason, redisScript, type FallbackHook } from './scripts.js';

/** Redis's clock in whole ms, over `t = redis.call('TIME')`. */
const NOW_MS = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`;

/**
 * Opens one connection of ARGV[2] on node ARGV[1] if the live nodes together hold fewer than ARGV[3]; refreshes the
 * node's liveness (ARGV[4] ms). KEYS: the nodes' sorted set, this node's hash; ARGV[5]: the prefix of the nodes'
 * hashes. Returns {1 if opened, the user's open connections (with this one), 1 if this node had lapsed}.
 */
const openScript = redisScript(`${NOW_MS}
local node, user, limit, ttl, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local mine = redis.call('ZSCORE', KEYS[1], node)
local lapsed = 0
if not mine or tonumber(mine) <= now then lapsed = 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = tonumber(redis.call('HGET', KEYS[2], user) or 0)
for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if other ~= node then open = open + tonumber(redis.call('HGET', prefix .. other, user) or 0) end
end
if open >= limit then return {0, open, lapsed} end
redis.call('HINCRBY', KEYS[2], user, 1)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[1], now + ttl, node)
return {1, open + 1, lapsed}
`);

/** Closes one connection of ARGV[1] in this node's hash (KEYS[1]); a count that reaches 0 goes. */
const closeScript = redisScript(`
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
`);

/** Pushes this node's liveness forward (KEYS as openScript; ARGV: node, ttl). Returns 1 if it had lapsed. */
const beatScript = redisScript(`${NOW_MS}
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if not mine or tonumber(mine) <= now then return 1 end
return 0
`);

/** Replaces this node's hash with its counts (ARGV[3..]: user, count, ...) and refreshes its liveness. */
const registerScript = redisScript(`${NOW_MS}
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
`);

/** Leaves: this node's hash and liveness go (a graceful stop; a node that dies lapses instead). */
const leaveScript = redisScript(`
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
`);

/** The per-user connection cap as the transports ask for it (TransportDeps.connections). */
export interface SharedConnectionQuota {
  opened(userId: string): Promise<ConnectionAdmission>;
  /** Resolves once Redis has the close too (or could not take it); never rejects. */
  closed(userId: string): Promise<void>;
  /**
   * Registers this node's counts in Redis afresh if they may be out of date there (after Redis was down or a
   * command failed); true when Redis holds them. Runs on its own when Redis comes back and on every heartbeat.
   */
  resync(): Promise<boolean>;
  /** Stops the heartbeat and takes this node's counts out of Redis. */
  close(): Promise<void>;
}

export interface RedisConnectionQuotaOptions {
  hub: RedisHub;
  /** The node's own limits: their cap and flood penalty apply first, and their cap alone while Redis cannot answer. */
  local: RateLimits;
  /** This node's id (unique in the cluster). */
  nodeId: string;
  /** A node that has not refreshed its liveness for this long is dead and its connections stop counting; default 15 s. */
  nodeTtlMs?: number;
  onFallback?: FallbackHook;
}

const PART = 'connections';
const OPENED: ConnectionAdmission = { ok: true };

function refusal(reason: string, retryAfterMs?: number): ConnectionAdmission {
  // 429, as the embedded cap answers (src/limits/chat-limits.ts connectionQuota).
  return { ok: false, error: new AppError('rate_limited', reason, retryAfterMs === undefined ? {} : { retryAfterMs }) };
}

export function createRedisConnectionQuota(options: RedisConnectionQuotaOptions): SharedConnectionQuota {
  const { hub, local, nodeId } = options;
  const ttlMs = Math.ceil(options.nodeTtlMs ?? 15_000);
  if (!(ttlMs >= 3)) throw new RangeError(`nodeTtlMs must be at least 3, got ${options.nodeTtlMs}`);
  const onFallback = options.onFallback ?? (() => {});
  const keys = [hub.key('conn-nodes'), hub.key(`conns:${nodeId}`)];
  const prefix = hub.key('conns:');
  /** This node's open connections per user: every one it let in, decided in Redis or not. */
  const counts = new Map<string, number>();
  /** Redis holds `counts` as this node's hash (as far as this node knows); while false, the local cap decides. */
  let synced = true;
  /** Commands sent and not answered: a registration waits for none to be left, so that none lands after it. */
  let inflight = 0;
  let registering: Promise<boolean> | null = null;

  const add = (userId: string, n: number) => {
    const next = (counts.get(userId) ?? 0) + n;
    if (next > 0) counts.set(userId, next);
    else counts.delete(userId);
  };

  function resync(): Promise<boolean> {
    if (synced) return Promise.resolve(true);
    if (registering !== null) return registering;
    if (!hub.up || inflight > 0) return Promise.resolve(false);
    const args = [nodeId, ttlMs, ...[...counts].flat()];
    // Commands sent from now on follow the registration on the one connection, so they count from it.
    synced = true;
    registering = registerScript(hub.command, keys, args).then(
      () => true,
      (err: unknown) => {
        synced = false;
        onFallback(failureReason(PART, err));
        return false;
      },
    );
    return registering.finally(() => {
      registering = null;
    });
  }

  /** Sends one command; a failure means Redis may not hold this node's counts any more. */
  async function send<T>(run: () => Promise<T>): Promise<T> {
    inflight += 1;
    try {
      return await run();
    } catch (err) {
      synced = false;
      throw err;
    } finally {
      inflight -= 1;
      if (!synced && inflight === 0) void resync();
    }
  }

  /** This node's own decision stands (the local cap already let the connection in). */
  function openLocally(userId: string, reason: string): ConnectionAdmission {
    onFallback(reason);
    add(userId, 1);
    return OPENED;
  }

  async function opened(userId: string): Promise<ConnectionAdmission> {
    const own = local.connectionOpened(userId);
    if (!own.ok) return refusal(own.reason, own.retryAfterMs);
    if (!hub.up) {
      synced = false;
      return openLocally(userId, downReason(PART));
    }
    if (!synced) {
      void resync();
      return openLocally(userId, `${PART}: this node's connections are being registered in Redis again`);
    }
    const hadCounts = counts.size > 0;
    let reply: number[];
    try {
      reply = ((await send(() => openScript(hub.command, keys, [nodeId, userId, own.limit, ttlMs, prefix]))) as number[]).map(Number);
    } catch (err) {
      return openLocally(userId, failureReason(PART, err));
    }
    const [ok, open, lapsed] = reply;
    if (ok === 1) add(userId, 1);
    else local.connectionClosed(userId);
    // This node's hash had expired (it could not reach Redis for a while): the counts it held are registered again.
    if (lapsed === 1 && hadCounts) {
      synced = false;
      void resync();
    }
    return ok === 1 ? OPENED : refusal(`too many connections for this user: ${open} open, at most ${own.limit} allowed`);
  }

  async function closed(userId: string): Promise<void> {
    // A close without a counted open (refused, or reported twice) must not free a slot it never held.
    if (!counts.has(userId)) return;
    add(userId, -1);
    local.connectionClosed(userId);
    // Not synced: the registration to come carries the count as it is then.
    if (!synced) return;
    if (!hub.up) {
      synced = false;
      return onFallback(downReason(PART));
    }
    try {
      await send(() => closeScript(hub.command, [keys[1]!], [userId]));
    } catch (err) {
      onFallback(failureReason(PART, err));
    }
  }

  function beat(): void {
    if (!hub.up) return;
    if (!synced) {
      void resync();
      return;
    }
    send(() => beatScript(hub.command, keys, [nodeId, ttlMs])).then(
      (lapsed) => {
        if (Number(lapsed) === 1 && counts.size > 0) {
          synced = false;
          void resync();
        }
      },
      (err: unknown) => onFallback(failureReason(PART, err)),
    );
  }

  const heartbeat = setInterval(beat, Math.floor(ttlMs / 3));
  heartbeat.unref();
  // A Redis that comes back may have lost everything (a restart): the counts are registered again in any case.
  const offState = hub.onState((state) => {
    if (state !== 'up') return;
    synced = false;
    void resync();
  });

  return {
    opened,
    closed,
    resync,
    async close() {
      clearInterval(heartbeat);
      offState();
      if (!hub.up) return;
      try {
        await leaveScript(hub.command, keys, [nodeId]);
      } catch {
        // Its liveness lapses on its own within nodeTtlMs.
      }
    },
  };
}
