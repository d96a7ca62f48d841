import type { Identity } from '../auth/identity.js';
import type { Config } from '../config.js';
import { AppError, PROTOCOL_VERSION, type ErrorMessage, type Hello } from '../protocol/index.js';
import { randomBase64url } from '../random-id.js';
import { clientAddress } from './client-address.js';
import type { AuthRequest, TransportDeps } from './deps.js';
import { errorMessage } from './session.js';

/**
 * What every transport does the same way around a connection: the hello frame, the backpressure level at which a
 * socket counts as congested, the refusal of a frame over the limit, the identification of a caller while it holds
 * a place among the unauthenticated, and the user's connection slot.
 */

export function newConnectionId(): string {
  return randomBase64url(9);
}

/** The first frame of every /ws and socket.io connection (PROTOCOL.md, hello). */
export function helloFrame(deps: Pick<TransportDeps, 'config' | 'providerName' | 'nodeId'>, connectionId: string, identity: Identity): Hello {
  const { config } = deps;
  return {
    type: 'hello',
    connectionId,
    userId: identity.userId,
    protocol: PROTOCOL_VERSION,
    provider: deps.providerName,
    model: config.model,
    limits: { maxFrameBytes: config.maxFrameBytes, messagesPerSecond: config.messagesPerSecond, chatsPerMinute: config.chatsPerMinute },
    nodeId: deps.nodeId,
  };
}

/**
 * Bytes a socket may hold unsent before its subscriptions stop writing deltas and wait for a drain: a quarter of its
 * budget, at most 64 KiB.
 */
export function softBackpressureLimit(config: Pick<Config, 'maxBackpressureBytes'>): number {
  return Math.min(64 * 1024, Math.floor(config.maxBackpressureBytes / 4));
}

/**
 * The largest frame uWS reads whole for us (its maxPayloadLength): four times our limit, so that a frame over the
 * limit but under this gets payload_too_large and close 1009 instead of uWS's abrupt drop (1006) of anything past
 * its own limit. Not more: uWS holds a frame's bytes as they arrive, and an engine.io connection exists before any
 * credentials are checked, so this is memory anyone can make a connection hold.
 */
export function frameReadCeiling(maxFrameBytes: number): number {
  return 4 * maxFrameBytes;
}

/** How a socket is closed after the error reply to a frame over the limit: RFC 6455 1009, message too big. */
export const FRAME_TOO_LARGE_CLOSE = { code: 1009, reason: 'frame too large' } as const;

/** The error reply to a frame over the limit (the socket is closed with FRAME_TOO_LARGE_CLOSE after it): /ws and socket.io alike. */
export function frameTooLarge(bytes: number, maxFrameBytes: number): ErrorMessage {
  return errorMessage(new AppError('payload_too_large', `frame of ${bytes} bytes is over the ${maxFrameBytes}-byte limit`), undefined);
}

/** The client's address, as the admission and the authenticate hook see it. */
export function callerAddress(deps: Pick<TransportDeps, 'config'>, peer: string, forwardedFor: string | undefined): string {
  return clientAddress(peer, forwardedFor, deps.config.trustProxy);
}

export interface Credentials {
  token: string | undefined;
  user: string | undefined;
  connectionId: string;
  address: string;
  request: AuthRequest;
}

/**
 * Identifies a caller that holds a place among the connections waiting to authenticate (deps.admission); the place
 * is given back once the check is over, whatever its outcome.
 */
export async function identifyPending(deps: Pick<TransportDeps, 'auth'>, slot: { release(): void }, credentials: Credentials): Promise<Identity> {
  try {
    return await deps.auth.identify(credentials);
  } finally {
    slot.release();
  }
}

/**
 * Takes one of the user's connection slots (a /ws or socket.io connection, an SSE stream); throws the refusal past
 * the user's cap. The returned release is idempotent. Async: in a cluster the cap is counted across nodes.
 */
export async function takeUserSlot(deps: Pick<TransportDeps, 'connections'>, userId: string): Promise<() => void> {
  const admitted = await deps.connections.opened(userId);
  if (!admitted.ok) throw admitted.error;
  let held = true;
  return () => {
    if (!held) return;
    held = false;
    deps.connections.closed(userId);
  };
}
