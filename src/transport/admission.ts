import { AppError } from '../protocol/index.js';
import { addressKey } from './client-address.js';

/**
 * A connection, socket.io session or request that has not proven who it is yet. `release()` frees its place once
 * it has (or once it is gone); it is idempotent.
 */
export interface PendingSlot {
  release(): void;
}

/** A refusal near the file-descriptor limit also closes the connection: the point is to free its descriptor. */
export type Refusal = { ok: false; error: AppError; closeConnection: boolean };
export type Admission = { ok: true; slot: PendingSlot } | Refusal;

export interface PendingAdmission {
  /** Takes a place for one unauthenticated connection from `address` (its IPv6 /64, see addressKey), or refuses it (503 past the total, 429 past the address's share). */
  admit(address: string): Admission;
  /** Whether `err` is this admission's refusal near the fd limit, whose answer also closes the connection. */
  closesConnection(err: unknown): boolean;
  /** Unauthenticated connections held now, in total and from one address. */
  pending(address?: string): number;
  close(): void;
}

export interface PendingAdmissionOptions {
  maxPending: number;
  maxPendingPerAddress: number;
  /** What a refusal tells the client to wait: a place frees within the handshake timeout at worst. */
  retryAfterMs: number;
  /** True while the process is close to its file-descriptor limit: then every new connection is refused (503). */
  nearFdLimit?: () => boolean;
}

/**
 * Bounds what clients that have not authenticated yet can make the server hold: engine.io sessions waiting for
 * socket.io's CONNECT, /ws upgrades and HTTP requests whose token is being checked. Without it one client looping
 * polling handshakes made hundreds of thousands of sessions (docs/rate-limits.md, "Before login"). A refusal
 * allocates nothing: it is decided from two counters before anything else is built for the connection.
 */
export function createPendingAdmission(options: PendingAdmissionOptions): PendingAdmission {
  const { maxPending, maxPendingPerAddress, retryAfterMs } = options;
  const nearFdLimit = options.nearFdLimit ?? (() => false);
  // Only addresses with something pending are kept: the map is bounded by maxPending.
  const byAddress = new Map<string, number>();
  let total = 0;
  // Built once: a flood is mostly refusals, and an Error captures a stack trace when it is made.
  const full: Refusal = {
    ok: false,
    error: new AppError('overloaded', `too many connections waiting to authenticate (${maxPending}); retry shortly`, { retryAfterMs }),
    closeConnection: false,
  };
  const addressFull: Refusal = {
    ok: false,
    error: new AppError('rate_limited', `too many connections from this address waiting to authenticate (at most ${maxPendingPerAddress})`, { retryAfterMs }),
    closeConnection: false,
  };
  const noDescriptors: Refusal = {
    ok: false,
    error: new AppError('overloaded', 'the server is near its open-file limit and takes no new connections; retry shortly', { retryAfterMs }),
    closeConnection: true,
  };

  function admit(peer: string): Admission {
    if (nearFdLimit()) return noDescriptors;
    // An IPv6 host is routinely given a whole /64: counted per address, one client would have 2^64 shares.
    const address = addressKey(peer);
    if (total >= maxPending) return full;
    const mine = byAddress.get(address) ?? 0;
    if (mine >= maxPendingPerAddress) return addressFull;
    byAddress.set(address, mine + 1);
    total += 1;
    let held = true;
    return {
      ok: true,
      slot: {
        release() {
          if (!held) return;
          held = false;
          total = Math.max(0, total - 1);
          const left = (byAddress.get(address) ?? 1) - 1;
          if (left <= 0) byAddress.delete(address);
          else byAddress.set(address, left);
        },
      },
    };
  }

  return {
    admit,
    closesConnection: (err) => err === noDescriptors.error,
    pending: (address) => (address === undefined ? total : (byAddress.get(addressKey(address)) ?? 0)),
    close() {
      byAddress.clear();
      total = 0;
    },
  };
}
