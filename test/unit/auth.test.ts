import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { base64url, SignJWT, type JWTPayload } from 'jose';
import { anonymousAddressKey, anonymousUserId } from '../../src/auth/anonymous.js';
import { createAuth, type Auth } from '../../src/auth/auth.js';
import { parseSubprotocols, tokenFromAuthorization } from '../../src/auth/credentials.js';
import { signToken } from '../../src/auth/sign.js';
import { AppError } from '../../src/protocol/index.js';

const SECRET = 'test-secret-that-is-at-least-32-bytes-long';
const NOW_MS = Date.UTC(2030, 0, 1, 12, 0, 0);
const NOW_SEC = NOW_MS / 1000;
const now = () => NOW_MS;

function jwtAuth(options: { clockToleranceSec?: number } = {}): Auth {
  return createAuth({ secret: SECRET, now, ...options });
}

/** Signs any claims with any HMAC algorithm and secret: the tokens a careless or hostile issuer would make. */
function sign(claims: JWTPayload, options: { alg?: string; secret?: string } = {}): Promise<string> {
  return new SignJWT(claims).setProtectedHeader({ alg: options.alg ?? 'HS256' }).sign(new TextEncoder().encode(options.secret ?? SECRET));
}

async function assertUnauthorized(promise: Promise<unknown>, message: string | RegExp, token?: string): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof AppError, `expected an AppError, got ${String(err)}`);
    assert.equal(err.code, 'unauthorized');
    assert.equal(err.status, 401);
    if (typeof message === 'string') assert.equal(err.message, message);
    else assert.match(err.message, message);
    if (token) assert.ok(!err.message.includes(token), 'the error message must not contain the token');
    return true;
  });
}

test('a valid HS256 token identifies its sub with its role, consumer by default', async () => {
  const auth = jwtAuth();
  assert.equal(auth.mode, 'jwt');
  assert.equal(auth.weakSecret, false);
  const staff = await sign({ sub: 'alice', role: 'staff', exp: NOW_SEC + 60 });
  assert.deepEqual(await auth.identify({ token: staff, connectionId: 'c1' }), { userId: 'alice', role: 'staff' });
  const provider = await sign({ sub: 'p-9', role: 'provider', exp: NOW_SEC + 60 });
  assert.deepEqual(await auth.identify({ token: provider, connectionId: 'c1' }), { userId: 'p-9', role: 'provider' });
  const plain = await sign({ sub: 'bob', exp: NOW_SEC + 60 });
  assert.deepEqual(await auth.identify({ token: plain, connectionId: 'c1' }), { userId: 'bob', role: 'consumer' });
});

test('with a secret, ?user= is ignored and a missing token is refused', async () => {
  const auth = jwtAuth();
  await assertUnauthorized(auth.identify({ user: 'alice', connectionId: 'c1' }), 'missing token: send a bearer token');
  await assertUnauthorized(auth.identify({ token: '', connectionId: 'c1' }), 'missing token: send a bearer token');
  const token = await sign({ sub: 'bob', exp: NOW_SEC + 60 });
  assert.deepEqual(await auth.identify({ token, user: 'alice', connectionId: 'c1' }), { userId: 'bob', role: 'consumer' });
});

test('an expired token is refused, unless it expired within the clock tolerance', async () => {
  const auth = jwtAuth({ clockToleranceSec: 5 });
  const expired = await sign({ sub: 'alice', exp: NOW_SEC - 6 });
  await assertUnauthorized(auth.identify({ token: expired, connectionId: 'c1' }), 'token expired', expired);
  const justExpired = await sign({ sub: 'alice', exp: NOW_SEC - 4 });
  assert.deepEqual(await auth.identify({ token: justExpired, connectionId: 'c1' }), { userId: 'alice', role: 'consumer' });
  const strict = jwtAuth({ clockToleranceSec: 0 });
  await assertUnauthorized(strict.identify({ token: justExpired, connectionId: 'c1' }), 'token expired');
});

test('a token whose nbf is in the future is refused, unless within the clock tolerance', async () => {
  const auth = jwtAuth();
  const early = await sign({ sub: 'alice', nbf: NOW_SEC + 60, exp: NOW_SEC + 120 });
  await assertUnauthorized(auth.identify({ token: early, connectionId: 'c1' }), 'token not yet valid (nbf is in the future)', early);
  const slightlyEarly = await sign({ sub: 'alice', nbf: NOW_SEC + 4, exp: NOW_SEC + 120 });
  assert.deepEqual(await auth.identify({ token: slightlyEarly, connectionId: 'c1' }), { userId: 'alice', role: 'consumer' });
});

test('a token signed with another secret is refused', async () => {
  const token = await sign({ sub: 'alice', exp: NOW_SEC + 60 }, { secret: 'another-secret-that-is-also-32-bytes-long' });
  await assertUnauthorized(jwtAuth().identify({ token, connectionId: 'c1' }), 'token signature is invalid', token);
});

test('an unsigned token (alg none) is refused', async () => {
  const encode = (value: object) => base64url.encode(JSON.stringify(value));
  const token = `${encode({ alg: 'none', typ: 'JWT' })}.${encode({ sub: 'alice', role: 'staff', exp: NOW_SEC + 60 })}.`;
  await assertUnauthorized(jwtAuth().identify({ token, connectionId: 'c1' }), 'token algorithm not allowed: only HS256 is accepted');
});

test('a token signed with HS512 (even with the right secret) is refused: HS256 only', async () => {
  const token = await sign({ sub: 'alice', exp: NOW_SEC + 60 }, { alg: 'HS512' });
  await assertUnauthorized(jwtAuth().identify({ token, connectionId: 'c1' }), 'token algorithm not allowed: only HS256 is accepted', token);
});

test('a token without sub is refused; one without exp is accepted unless requireExp is set', async () => {
  const auth = jwtAuth();
  const noSub = await sign({ role: 'staff', exp: NOW_SEC + 60 });
  await assertUnauthorized(auth.identify({ token: noSub, connectionId: 'c1' }), 'token has no sub claim');
  const noExp = await sign({ sub: 'alice' });
  assert.deepEqual(await auth.identify({ token: noExp, connectionId: 'c1' }), { userId: 'alice', role: 'consumer' });
  const strict = createAuth({ secret: SECRET, now, requireExp: true });
  await assertUnauthorized(strict.identify({ token: noExp, connectionId: 'c1' }), 'token has no exp claim');
  assert.deepEqual(await strict.identify({ token: await sign({ sub: 'alice', exp: NOW_SEC + 60 }), connectionId: 'c1' }), {
    userId: 'alice',
    role: 'consumer',
  });
  const badExp = await sign({ sub: 'alice', exp: 'soon' as unknown as number });
  await assertUnauthorized(auth.identify({ token: badExp, connectionId: 'c1' }), 'token claim exp is invalid');
});

/** Signs a claims text as it is, e.g. with a number JSON.stringify cannot write (1e309 reads back as Infinity). */
function signRaw(claimsJson: string): string {
  const header = base64url.encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = base64url.encode(claimsJson);
  const mac = createHmac('sha256', SECRET).update(`${header}.${body}`).digest();
  return `${header}.${body}.${base64url.encode(mac)}`;
}

test('with maxTtlSec set, a token valid for longer than it is refused; unset, any lifetime is accepted', async () => {
  const bounded = createAuth({ secret: SECRET, now, maxTtlSec: 3600 });
  const tooLong = /^token lifetime too long: exp is more than 3600 s after (iat|now); this server accepts tokens valid for at most 3600 s$/;
  const forever = await sign({ sub: 'alice', exp: 1e300 });
  await assertUnauthorized(
    bounded.identify({ token: forever, connectionId: 'c1' }),
    'token lifetime too long: exp is more than 3600 s after now; this server accepts tokens valid for at most 3600 s',
    forever,
  );
  await assertUnauthorized(bounded.identify({ token: await sign({ sub: 'alice', iat: NOW_SEC, exp: 1e300 }), connectionId: 'c1' }), tooLong);
  // exp - iat: an hour and a minute is too long even when most of it has passed.
  await assertUnauthorized(bounded.identify({ token: await sign({ sub: 'alice', iat: NOW_SEC - 3000, exp: NOW_SEC + 660 }), connectionId: 'c1' }), tooLong);
  // An iat in the future does not shorten the lifetime: it counts from now.
  await assertUnauthorized(bounded.identify({ token: await sign({ sub: 'alice', iat: 1e300 - 60, exp: 1e300 }), connectionId: 'c1' }), tooLong);
  // exp 1e309 reads as Infinity: refused, not compared as NaN.
  await assertUnauthorized(bounded.identify({ token: signRaw(`{"sub":"alice","exp":1e309}`), connectionId: 'c1' }), tooLong);
  await assertUnauthorized(bounded.identify({ token: signRaw(`{"sub":"alice","iat":1e309,"exp":1e309}`), connectionId: 'c1' }), tooLong);
  // A token that never expires outlives any bound.
  await assertUnauthorized(
    bounded.identify({ token: await sign({ sub: 'alice' }), connectionId: 'c1' }),
    'token has no exp claim: this server accepts tokens valid for at most 3600 s',
  );

  const hour = { userId: 'alice', role: 'consumer' };
  assert.deepEqual(await bounded.identify({ token: await sign({ sub: 'alice', iat: NOW_SEC, exp: NOW_SEC + 3600 }), connectionId: 'c1' }), hour);
  assert.deepEqual(await bounded.identify({ token: await sign({ sub: 'alice', exp: NOW_SEC + 3600 }), connectionId: 'c1' }), hour);
  assert.deepEqual(await bounded.identify({ token: await sign({ sub: 'alice', iat: NOW_SEC - 3000, exp: NOW_SEC + 600 }), connectionId: 'c1' }), hour);
  // An issuer whose clock runs a little ahead: iat 3 s in the future is within the 5 s tolerance.
  assert.deepEqual(await bounded.identify({ token: await sign({ sub: 'alice', iat: NOW_SEC + 3, exp: NOW_SEC + 3603 }), connectionId: 'c1' }), hour);

  assert.deepEqual(await jwtAuth().identify({ token: forever, connectionId: 'c1' }), hour);
  assert.throws(() => createAuth({ secret: SECRET, maxTtlSec: 0 }), RangeError);
});

test('with an audience and an issuer set, a token must carry both; without them aud and iss are not checked', async () => {
  const strict = createAuth({ secret: SECRET, now, audience: 'chatwire', issuer: 'https://id.example' });
  const exp = NOW_SEC + 60;
  const good = await sign({ sub: 'alice', exp, aud: 'chatwire', iss: 'https://id.example' });
  assert.deepEqual(await strict.identify({ token: good, connectionId: 'c1' }), { userId: 'alice', role: 'consumer' });
  const inList = await sign({ sub: 'alice', exp, aud: ['billing', 'chatwire'], iss: 'https://id.example' });
  assert.equal((await strict.identify({ token: inList, connectionId: 'c1' })).userId, 'alice');
  const otherAud = await sign({ sub: 'alice', exp, aud: 'billing', iss: 'https://id.example' });
  await assertUnauthorized(strict.identify({ token: otherAud, connectionId: 'c1' }), 'token audience (aud) is not this service');
  const otherIss = await sign({ sub: 'alice', exp, aud: 'chatwire', iss: 'https://evil.example' });
  await assertUnauthorized(strict.identify({ token: otherIss, connectionId: 'c1' }), 'token issuer (iss) is not the one this service trusts');
  const neither = await sign({ sub: 'alice', exp });
  await assert.rejects(strict.identify({ token: neither, connectionId: 'c1' }), (err: AppError) => err.code === 'unauthorized');
  // The default: a token for another service that shares the secret is accepted (documented).
  assert.equal((await jwtAuth().identify({ token: otherAud, connectionId: 'c1' })).userId, 'alice');
});

test('a sub that is empty, too long, or not a string is refused', async () => {
  const auth = jwtAuth();
  for (const sub of ['', 'x'.repeat(129), 'line\nbreak']) {
    const token = await sign({ sub, exp: NOW_SEC + 60 });
    await assertUnauthorized(auth.identify({ token, connectionId: 'c1' }), 'token claim sub is invalid');
  }
  const numeric = await sign({ sub: 42 as unknown as string, exp: NOW_SEC + 60 });
  await assertUnauthorized(auth.identify({ token: numeric, connectionId: 'c1' }), 'token claim sub is invalid');
  const longest = await sign({ sub: 'x'.repeat(128), exp: NOW_SEC + 60 });
  assert.equal((await auth.identify({ token: longest, connectionId: 'c1' })).userId.length, 128);
});

test('a role other than consumer, provider or staff is refused', async () => {
  const token = await sign({ sub: 'alice', role: 'admin', exp: NOW_SEC + 60 });
  await assertUnauthorized(jwtAuth().identify({ token, connectionId: 'c1' }), 'token role must be one of consumer, provider, staff');
});

test('garbage and oversized tokens are refused without echoing them', async () => {
  const auth = jwtAuth();
  await assertUnauthorized(auth.identify({ token: 'not-a-jwt', connectionId: 'c1' }), 'malformed token', 'not-a-jwt');
  await assertUnauthorized(auth.identify({ token: 'a.b.c', connectionId: 'c1' }), 'malformed token');
  await assertUnauthorized(auth.identify({ token: 'x'.repeat(9000), connectionId: 'c1' }), 'token too large');
});

test('open mode trusts a well-formed ?user= as a consumer; callers without one are one anonymous user per address', async () => {
  const auth = createAuth({});
  assert.equal(auth.mode, 'open');
  assert.deepEqual(await auth.identify({ user: 'alice@example.com', connectionId: 'c1', address: '203.0.113.7' }), {
    userId: 'alice@example.com',
    role: 'consumer',
  });
  const anon = await auth.identify({ connectionId: 'c7', address: '203.0.113.7' });
  assert.equal(anon.role, 'consumer');
  assert.match(anon.userId, /^anon-[0-9a-f]{16}$/);
  // Another connection from the same address is the same user (same buckets); an empty ?user= is no user.
  assert.equal((await auth.identify({ connectionId: 'c8', address: '203.0.113.7' })).userId, anon.userId);
  assert.equal((await auth.identify({ user: '', connectionId: 'c9', address: '203.0.113.7' })).userId, anon.userId);
  assert.notEqual((await auth.identify({ connectionId: 'c7', address: '203.0.113.8' })).userId, anon.userId);
  // Callers whose address is not known share one user rather than each getting fresh buckets.
  assert.equal((await auth.identify({ connectionId: 'c1' })).userId, (await auth.identify({ connectionId: 'c2' })).userId);
  // A token does not raise anyone's role in open mode: there is nothing to check it against.
  const staff = await sign({ sub: 'mallory', role: 'staff', exp: NOW_SEC + 60 });
  assert.deepEqual(await auth.identify({ token: staff, user: 'bob', connectionId: 'c9' }), { userId: 'bob', role: 'consumer' });
});

test('an anonymous user id is keyed: it does not show the address, and another process (another key) gives another id', async () => {
  const key = new Uint8Array(32).fill(7);
  const a = createAuth({ anonymousKey: key });
  const b = createAuth({ anonymousKey: key });
  const id = (await a.identify({ connectionId: 'c1', address: '198.51.100.23' })).userId;
  assert.equal((await b.identify({ connectionId: 'c2', address: '198.51.100.23' })).userId, id);
  assert.equal(anonymousUserId(key, '198.51.100.23'), id);
  assert.ok(!id.includes('198') && !id.includes('c633'), id);
  assert.notEqual((await createAuth({}).identify({ connectionId: 'c1', address: '198.51.100.23' })).userId, id);
});

test('an IPv4 address is one anonymous user however it is spelt, and an IPv6 client is keyed by its /64', () => {
  for (const spelling of ['192.0.2.1', '::ffff:192.0.2.1', '0000:0000:0000:0000:0000:ffff:c000:0201', '::FFFF:C000:201']) {
    assert.equal(anonymousAddressKey(spelling), '192.0.2.1', spelling);
  }
  assert.equal(anonymousAddressKey('2001:db8:1:2:aaaa::1'), '2001:db8:1:2::/64');
  assert.equal(anonymousAddressKey('2001:0db8:0001:0002:ffff:ffff:ffff:ffff'), '2001:db8:1:2::/64');
  assert.equal(anonymousAddressKey('2001:db8:1:3::1'), '2001:db8:1:3::/64');
  assert.equal(anonymousAddressKey('::1'), '0:0:0:0::/64');
  assert.equal(anonymousAddressKey('fe80::1%eth0'), 'fe80:0:0:0::/64');
  assert.equal(anonymousAddressKey('2001:db8::192.0.2.1'), '2001:db8:0:0::/64');
  // Not an address (a host that passes none): kept as given, so such callers share one user.
  assert.equal(anonymousAddressKey(''), '');
  const key = new Uint8Array(32);
  assert.equal(anonymousUserId(key, '2001:db8:1:2::1'), anonymousUserId(key, '2001:db8:1:2:ffff::9'));
  assert.notEqual(anonymousUserId(key, '2001:db8:1:2::1'), anonymousUserId(key, '2001:db8:1:3::1'));
});

test('open mode asks admitAnonymous before letting an anonymous caller in: refused, it is overloaded (503); named users are not asked', async () => {
  const asked: string[] = [];
  const auth = createAuth({
    admitAnonymous: (userId) => {
      asked.push(userId);
      return asked.length <= 1;
    },
  });
  const first = await auth.identify({ connectionId: 'c1', address: '203.0.113.1' });
  await assert.rejects(auth.identify({ connectionId: 'c2', address: '203.0.113.2' }), (err: unknown) => {
    assert.ok(err instanceof AppError);
    assert.equal(err.code, 'overloaded');
    assert.equal(err.status, 503);
    assert.equal(err.message, 'too many anonymous users right now; retry later');
    return true;
  });
  assert.equal((await auth.identify({ user: 'alice', connectionId: 'c3', address: '203.0.113.2' })).userId, 'alice');
  assert.equal(asked.length, 2);
  assert.equal(asked[0], first.userId);
});

test('open mode refuses user ids outside 1..128 conservative characters', async () => {
  const auth = createAuth();
  for (const user of ['x'.repeat(129), 'al ice', 'a/b', 'name\u0000', '<script>']) {
    await assertUnauthorized(auth.identify({ user, connectionId: 'c1' }), /^invalid user id: /);
  }
  assert.equal((await auth.identify({ user: 'x'.repeat(128), connectionId: 'c1' })).userId.length, 128);
});

test('an empty secret is a configuration error, and a short one is flagged as weak', () => {
  assert.throws(() => createAuth({ secret: '' }), /must not be empty/);
  assert.throws(() => createAuth({ secret: ' \t' }), /must not be empty or whitespace only/);
  assert.throws(() => createAuth({ secret: SECRET, clockToleranceSec: -1 }), RangeError);
  assert.equal(createAuth({ secret: 'short' }).weakSecret, true);
});

test('signToken issues a token that identify accepts, expiring after its ttl', async () => {
  const token = await signToken({ secret: SECRET, sub: 'carol', role: 'provider', ttlSec: 60, now });
  assert.deepEqual(await jwtAuth().identify({ token, connectionId: 'c1' }), { userId: 'carol', role: 'provider' });
  const later = createAuth({ secret: SECRET, now: () => NOW_MS + 66_000 });
  await assertUnauthorized(later.identify({ token, connectionId: 'c1' }), 'token expired');
});

test('the token is read from the WebSocket subprotocol list, and only chatwire.v1 is echoed', () => {
  assert.deepEqual(parseSubprotocols('chatwire.v1, bearer.aaa.bbb.ccc'), { token: 'aaa.bbb.ccc', protocol: 'chatwire.v1' });
  assert.deepEqual(parseSubprotocols('bearer.aaa.bbb.ccc,chatwire.v1'), { token: 'aaa.bbb.ccc', protocol: 'chatwire.v1' });
  assert.deepEqual(parseSubprotocols('bearer.t0k'), { token: 't0k', protocol: undefined });
  assert.deepEqual(parseSubprotocols('chatwire.v1'), { token: undefined, protocol: 'chatwire.v1' });
  assert.deepEqual(parseSubprotocols('chatwire.v2, bearer.'), { token: undefined, protocol: undefined });
  assert.deepEqual(parseSubprotocols(''), { token: undefined, protocol: undefined });
  assert.deepEqual(parseSubprotocols(undefined), { token: undefined, protocol: undefined });
});

test('the token is read from an Authorization: Bearer header', () => {
  assert.equal(tokenFromAuthorization('Bearer aaa.bbb.ccc'), 'aaa.bbb.ccc');
  assert.equal(tokenFromAuthorization('bearer   aaa.bbb.ccc '), 'aaa.bbb.ccc');
  assert.equal(tokenFromAuthorization('Basic dXNlcjpwYXNz'), undefined);
  assert.equal(tokenFromAuthorization('Bearer'), undefined);
  assert.equal(tokenFromAuthorization('Bearer a b'), undefined);
  assert.equal(tokenFromAuthorization(undefined), undefined);
});

test('scripts/token prints a token the server accepts', async () => {
  const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../scripts/token.js');
  const run = spawnSync(process.execPath, [script, '--sub', 'dave', '--role', 'staff', '--ttl', '600', '--secret', SECRET], {
    encoding: 'utf8',
    env: { PATH: process.env.PATH },
  });
  assert.equal(run.status, 0, run.stderr);
  const token = run.stdout.trim();
  assert.deepEqual(await createAuth({ secret: SECRET }).identify({ token, connectionId: 'c1' }), { userId: 'dave', role: 'staff' });

  const viaEnv = spawnSync(process.execPath, [script, '--sub', 'erin'], { encoding: 'utf8', env: { PATH: process.env.PATH, CHATWIRE_JWT_SECRET: SECRET } });
  assert.equal(viaEnv.status, 0, viaEnv.stderr);
  assert.deepEqual(await createAuth({ secret: SECRET }).identify({ token: viaEnv.stdout.trim(), connectionId: 'c1' }), { userId: 'erin', role: 'consumer' });

  // A server that checks aud and iss accepts the token too: the script signs with the configured ones.
  const scopedEnv = { PATH: process.env.PATH, CHATWIRE_JWT_SECRET: SECRET, CHATWIRE_JWT_AUDIENCE: 'chatwire', CHATWIRE_JWT_ISSUER: 'https://id.example' };
  const scoped = spawnSync(process.execPath, [script, '--sub', 'erin'], { encoding: 'utf8', env: scopedEnv });
  assert.equal(scoped.status, 0, scoped.stderr);
  const scopedAuth = createAuth({ secret: SECRET, audience: 'chatwire', issuer: 'https://id.example' });
  assert.deepEqual(await scopedAuth.identify({ token: scoped.stdout.trim(), connectionId: 'c1' }), { userId: 'erin', role: 'consumer' });

  const noSecret = spawnSync(process.execPath, [script, '--sub', 'erin'], { encoding: 'utf8', env: { PATH: process.env.PATH } });
  assert.equal(noSecret.status, 2);
  assert.match(noSecret.stderr, /no secret: set CHATWIRE_JWT_SECRET or pass --secret/);
  // Set but empty is a mistake (a template variable that was missing), not "no secret".
  const emptySecret = spawnSync(process.execPath, [script, '--sub', 'erin'], { encoding: 'utf8', env: { PATH: process.env.PATH, CHATWIRE_JWT_SECRET: '' } });
  assert.equal(emptySecret.status, 2);
  assert.match(emptySecret.stderr, /CHATWIRE_JWT_SECRET="": set but empty: give a value, or unset CHATWIRE_JWT_SECRET for open mode/);
});
