import { z } from 'zod';
import { RoleSchema } from '../protocol/index.js';

/**
 * A JWT `sub`: 1..128 characters, no control characters (it ends up in logs
 * and in SQLite keys). Issuers use all sorts of ids (`auth0|abc`, emails,
 * UUIDs), so beyond that it is taken as it is.
 */
export const SubjectSchema = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[^\p{Cc}]+$/u, 'must not contain control characters');

/**
 * A user id given as `?user=` in open mode: nobody vouches for it, so only a
 * conservative set of characters is taken (letters, digits, `.`, `_`, `-`, `@`).
 */
export const OpenUserIdSchema = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[A-Za-z0-9._@-]+$/, 'may only contain letters, digits, ".", "_", "-" and "@"');

/** The claims chatwire reads from a verified token; anything else in it is ignored. */
export const TokenClaimsSchema = z.object({
  sub: SubjectSchema,
  role: RoleSchema.default('consumer'),
});

export type TokenClaims = z.infer<typeof TokenClaimsSchema>;
