import { AppError } from '../protocol/index.js';

/** CHATWIRE_ALLOWED_ORIGINS as a check: throws AppError('forbidden') for a browser origin not on the list; `*` allows any. */
export function originPolicy(allowedOrigins: '*' | readonly string[]): (origin: string | undefined) => void {
  const allowed = allowedOrigins === '*' ? null : new Set(allowedOrigins);
  return (origin) => {
    if (allowed !== null && origin !== undefined && !allowed.has(origin)) throw new AppError('forbidden', `origin ${origin} is not allowed`);
  };
}
