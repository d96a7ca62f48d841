import { z } from 'zod';

/**
 * The error catalogue: every error a client can see is one of these codes.
 * PROTOCOL.md's error table and docs/protocol.md are checked against this
 * table by test/unit/protocol-errors.test.ts.
 */
export const errorCatalogue = {
  bad_request: { status: 400, retryable: false, when: 'not JSON, unknown type, schema failure (`details` holds the paths)' },
  unauthorized: { status: 401, retryable: false, when: 'no or bad credentials' },
  forbidden: { status: 403, retryable: false, when: "another user's conversation, task or consumer record" },
  not_found: { status: 404, retryable: false, when: 'no such task, conversation or record' },
  payload_too_large: { status: 413, retryable: false, when: 'frame or body over the limit (the WebSocket closes with 1009)' },
  rate_limited: { status: 429, retryable: true, when: 'a bucket is empty; `retryAfterMs` says when to retry' },
  idempotency_conflict: { status: 422, retryable: false, when: 'a `clientMessageId` or `Idempotency-Key` reused by the same user for a different message' },
  overloaded: { status: 503, retryable: true, when: 'the task queue is full, or storage is unreachable; nothing was stored' },
  node_lost: { status: 503, retryable: true, when: 'cluster mode: the node running the task died; `retryable` true' },
  upstream_error: { status: 502, retryable: true, when: 'the model provider failed' },
  upstream_timeout: { status: 504, retryable: true, when: 'the model provider did not answer in time' },
  worker_failed: { status: 500, retryable: true, when: 'the worker running the task died' },
  internal: { status: 500, retryable: false, when: 'anything else; the message holds no stack trace' },
} as const satisfies Record<string, { status: number; retryable: boolean; when: string }>;

export type ErrorCode = keyof typeof errorCatalogue;
export const errorCodes = Object.keys(errorCatalogue) as [ErrorCode, ...ErrorCode[]];
export const ErrorCodeSchema = z.enum(errorCodes);

export interface ErrorDetail {
  path: string;
  message: string;
}

export interface AppErrorOptions {
  retryAfterMs?: number;
  details?: ErrorDetail[];
  cause?: unknown;
}

/** The one error type that crosses the wire. Anything else becomes `internal`. */
export class AppError extends Error {
  readonly code: ErrorCode;
  readonly retryAfterMs: number | undefined;
  readonly details: ErrorDetail[] | undefined;

  constructor(code: ErrorCode, message: string, options: AppErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AppError';
    this.code = code;
    this.retryAfterMs = options.retryAfterMs;
    this.details = options.details;
  }

  get status(): number {
    return errorCatalogue[this.code].status;
  }

  get retryable(): boolean {
    return errorCatalogue[this.code].retryable;
  }
}

export function isAppError(err: unknown): err is AppError {
  return err instanceof AppError;
}

/** Maps anything thrown to an AppError whose message is safe to show a client. */
export function toAppError(err: unknown): AppError {
  if (err instanceof AppError) return err;
  return new AppError('internal', 'internal error', { cause: err });
}

/** Turns zod issues into the `details` of a bad_request: one entry per failing path. */
export function detailsFromZod(error: z.ZodError): ErrorDetail[] {
  return error.issues.slice(0, 20).map((issue) => ({
    path: issue.path.length === 0 ? '(root)' : issue.path.map(String).join('.'),
    message: issue.message,
  }));
}

export function badRequestFromZod(error: z.ZodError, what = 'message'): AppError {
  const details = detailsFromZod(error);
  const first = details[0];
  const summary = first ? `${first.path}: ${first.message}` : 'invalid';
  return new AppError('bad_request', `invalid ${what}: ${summary}`, { details });
}
