/**
 * Prints a token that the server accepts.
 * Usage: npm run token -- --sub alice [--role consumer|provider|staff] [--ttl 3600] [--secret ...]
 * The secret is --secret, else CHATWIRE_JWT_SECRET (read through loadConfig).
 */
import { parseArgs } from 'node:util';
import { SubjectSchema } from '../src/auth/claims.js';
import { signToken } from '../src/auth/sign.js';
import { loadConfig } from '../src/config.js';
import { RoleSchema } from '../src/protocol/index.js';

const usage = 'usage: npm run token -- --sub <user id> [--role consumer|provider|staff] [--ttl <seconds>] [--secret <secret>]';

function fail(message: string): never {
  process.stderr.write(`${message}\n${usage}\n`);
  process.exit(2);
}

function parsedArgs() {
  try {
    return parseArgs({
      options: {
        sub: { type: 'string' },
        role: { type: 'string', default: 'consumer' },
        ttl: { type: 'string', default: '3600' },
        secret: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }).values;
  } catch (err) {
    fail((err as Error).message);
  }
}
const values = parsedArgs();
if (values.help) {
  process.stdout.write(`${usage}\n`);
  process.exit(0);
}
if (values.sub === undefined) fail('--sub is required');
const sub = SubjectSchema.safeParse(values.sub);
if (!sub.success) fail(`--sub ${sub.error.issues[0]?.message ?? 'is invalid'} (1..128 characters)`);
const role = RoleSchema.safeParse(values.role);
if (!role.success) fail(`--role must be one of ${RoleSchema.options.join(', ')}`);
const ttlSec = Number(values.ttl);
if (!Number.isInteger(ttlSec) || ttlSec < 1) fail('--ttl must be a whole number of seconds >= 1');
function configured(): { jwtSecret?: string; jwtAudience?: string; jwtIssuer?: string } {
  try {
    return loadConfig();
  } catch (err) {
    fail((err as Error).message);
  }
}
const config = configured();
const secret = values.secret ?? config.jwtSecret;
if (secret === undefined) fail('no secret: set CHATWIRE_JWT_SECRET or pass --secret');

try {
  // The audience and issuer the server checks, when it checks them (CHATWIRE_JWT_AUDIENCE / CHATWIRE_JWT_ISSUER).
  const token = await signToken({ secret, sub: sub.data, role: role.data, ttlSec, audience: config.jwtAudience, issuer: config.jwtIssuer });
  process.stdout.write(`${token}\n`);
} catch (err) {
  fail(`cannot sign: ${(err as Error).message}`);
}
