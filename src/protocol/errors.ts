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

/** At most this many `details` in one error, each message at most this long: a refusal stays small whatever the input. */
export const MAX_ERROR_DETAILS = 10;
export const MAX_ERROR_TEXT = 200;

/** `text` cut to `max` characters, saying how much was left out. */
export function capText(text: string, max = MAX_ERROR_TEXT): string {
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length - max} more characters)`;
}

/**
 * Turns zod issues into the `details` of a bad_request: one entry per failing path, at most MAX_ERROR_DETAILS,
 * each message capped. A strict object's unknown keys are one issue listing every key: it is cut to the first few
 * and a count, or a frame of thousands of unknown keys would be answered with an error larger than itself.
 */
export function detailsFromZod(error: z.ZodError): ErrorDetail[] {
  const issues = error.issues;
  const details = issues.slice(0, MAX_ERROR_DETAILS).map((issue) => ({
    path: capText(issue.path.length === 0 ? '(root)' : issue.path.map(String).join('.')),
    message: capText(issue.code === 'unrecognized_keys' ? unrecognizedKeys(issue.keys) : issue.message),
  }));
  if (issues.length > MAX_ERROR_DETAILS) details.push({ path: '(root)', message: `${issues.length - MAX_ERROR_DETAILS} more problems not listed` });
  return details;
}

function unrecognizedKeys(keys: readonly string[]): string {
  const shown = keys.slice(0, 5).map((k) => JSON.stringify(capText(k, 32)));
  const more = keys.length > shown.length ? ` and ${keys.length - shown.length} more` : '';
  return `Unrecognized key${keys.length === 1 ? '' : 's'}: ${shown.join(', ')}${more}`;
}

export function badRequestFromZod(error: z.ZodError, what = 'message'): AppError {
  const details = detailsFromZod(error);
  const first = details[0];
  const summary = first ? `${first.path}: ${first.message}` : 'invalid';
  return new AppError('bad_request', `invalid ${what}: ${summary}`, { details });
}
