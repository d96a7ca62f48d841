/**
 * Lua scripts on the node's Redis connection, and how a Redis-backed part says it fell back to its local state.
 *
 * A script runs as EVALSHA: its body crosses the network only when the server does not know it yet (NOSCRIPT, after
 * a restart or a SCRIPT FLUSH), and then EVAL sends it once and loads it for the calls after.
 */
import crypto from 'node:crypto';
import type { Redis } from 'ioredis';

export type ScriptArg = string | number;

/** Runs one Lua script with its keys (every key the script names, for the server to see) and arguments. */
export type RedisScript = (redis: Redis, keys: readonly string[], args: readonly ScriptArg[]) => Promise<unknown>;

export function redisScript(lua: string): RedisScript {
  const sha = crypto.createHash('sha1').update(lua).digest('hex');
  return async (redis, keys, args) => {
    try {
      return await redis.evalsha(sha, keys.length, ...keys, ...args);
    } catch (err) {
      if (!(err instanceof Error) || !err.message.startsWith('NOSCRIPT')) throw err;
      return redis.eval(lua, keys.length, ...keys, ...args);
    }
  };
}

/**
 * Told each time an operation was answered from the node's own state because Redis could not answer (down, or a
 * command failed): `reason` says which part and why. The wiring counts these and logs the first of a spell.
 */
export type FallbackHook = (reason: string) => void;

/** Why a Redis call failed, for a FallbackHook. */
export function failureReason(part: string, err: unknown): string {
  return `${part}: ${err instanceof Error ? err.message : String(err)}`;
}

/** The reason given while the hub is down: no command is tried then (it would fail at once). */
export function downReason(part: string): string {
  return `${part}: Redis is down`;
}

/**
 * Redis's clock in ms, as a Lua expression over `t = redis.call('TIME')`: every node reads the one clock, so the
 * nodes' own clocks do not matter. Redis 7 replicates a script's effects, so TIME before a write is allowed.
 */
export const LUA_NOW_MS = `(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)`;
