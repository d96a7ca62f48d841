import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import type { Logger } from 'pino';

const LIMITS_FILE = '/proc/self/limits';
const FD_DIR = '/proc/self/fd';

export interface FdLimits {
  soft: number;
  hard: number;
}

/** RLIMIT_NOFILE as the kernel reports it; null where there is no /proc (not Linux) or it cannot be read. */
export function readFdLimits(): FdLimits | null {
  let text: string;
  try {
    text = fs.readFileSync(LIMITS_FILE, 'utf8');
  } catch {
    return null;
  }
  const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(text);
  if (!m) return null;
  const soft = Number(m[1]);
  const hard = m[2] === 'unlimited' ? Number.POSITIVE_INFINITY : Number(m[2]);
  return Number.isFinite(soft) && !Number.isNaN(hard) ? { soft, hard } : null;
}

/**
 * Raises the soft open-file limit to the hard one: every connection is a descriptor, and the usual soft default
 * (1024) is far below what the process may use. Node has no setrlimit; prlimit(1) from util-linux sets it on a
 * running process, our own included. Without it (not Linux, not installed) the start goes on at the soft limit.
 */
export function raiseFdLimit(log: Logger): FdLimits | null {
  const before = readFdLimits();
  if (before === null) {
    log.info('open-file limit unknown on this system (no /proc/self/limits); not raised');
    return null;
  }
  if (before.soft >= before.hard || !Number.isFinite(before.hard)) return before;
  try {
    execFileSync('prlimit', ['--pid', String(process.pid), `--nofile=${before.hard}:${before.hard}`], { stdio: 'ignore', timeout: 5000 });
  } catch (err) {
    log.warn(
      { soft: before.soft, hard: before.hard, err: err instanceof Error ? err.message : String(err) },
      'could not raise the open-file limit (is prlimit from util-linux installed?); going on at the soft limit',
    );
    return before;
  }
  const after = readFdLimits() ?? before;
  if (after.soft > before.soft) log.info({ from: before.soft, to: after.soft }, 'raised the open-file limit to its hard limit');
  return after;
}

export interface FdGuard {
  /** True while the open descriptors are within the headroom of the limit: new connections are then refused. */
  nearLimit(): boolean;
  /** Descriptors open at the last count (0 when they cannot be counted). */
  open(): number;
  close(): void;
}

export interface FdGuardOptions {
  log: Logger;
  /** The soft limit to guard; read from /proc/self/limits when not given. */
  limit?: number;
  /** How often the open descriptors are counted. */
  intervalMs?: number;
}

/** Spare descriptors kept for what must go on working near the limit: /healthz, the stores, a refusal's own accept. */
export function fdHeadroom(limit: number): number {
  return Math.min(1024, Math.max(64, Math.floor(limit / 8)));
}

// A log line per episode, and not more often than this however the count hovers around the threshold.
const LOG_EVERY_MS = 60_000;

/**
 * Counts the process's open descriptors (/proc/self/fd) on a short interval and says when they come within
 * fdHeadroom() of the limit. Out of descriptors, uWS's accept loop spins and nothing answers, not even /healthz:
 * refusing new connections a little before keeps the existing ones served and health checks answered.
 */
export function createFdGuard(options: FdGuardOptions): FdGuard {
  const { log } = options;
  const limit = options.limit ?? readFdLimits()?.soft;
  let counted = 0;
  let near = false;
  let lastLogAt = Number.NEGATIVE_INFINITY;
  if (limit === undefined || !fs.existsSync(FD_DIR)) {
    log.info('open descriptors cannot be counted on this system; connections are not refused near the open-file limit');
    return { nearLimit: () => false, open: () => 0, close() {} };
  }
  const threshold = limit - fdHeadroom(limit);
  let busy = false;
  // Connections asked about since the last count: each may have taken a descriptor the count has not seen yet,
  // so that a burst between two counts cannot run past the headroom.
  let since = 0;
  const count = () => {
    if (busy) return;
    busy = true;
    fs.readdir(FD_DIR, (err, entries) => {
      busy = false;
      since = 0;
      // EMFILE: reading the directory needs a descriptor too, so failing to is itself the sign.
      const open = err ? limit : entries.length;
      counted = open;
      const wasNear = near;
      near = open >= threshold;
      if (near && !wasNear && performance.now() - lastLogAt >= LOG_EVERY_MS) {
        lastLogAt = performance.now();
        log.warn({ open, limit, threshold }, 'near the open-file limit: refusing new connections (503) and serving the open ones');
      }
    });
  };
  count();
  const timer = setInterval(count, options.intervalMs ?? 250);
  timer.unref();
  return {
    nearLimit: () => {
      if (near) return true;
      if (counted + since < threshold) {
        since += 1;
        return false;
      }
      // The estimate reached the threshold: count now rather than refuse on a guess until the next interval.
      count();
      return true;
    },
    open: () => counted,
    close: () => clearInterval(timer),
  };
}
