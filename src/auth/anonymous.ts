import { createHmac } from 'node:crypto';
import { addressKey } from '../transport/client-address.js';

/** Hex digits of the keyed hash in an anonymous user id: 64 bits, so two addresses share an id only by a 2^-64 chance. */
const ID_HEX_DIGITS = 16;

/** Who an anonymous caller is, from its address: the address key that also bounds what one address may hold pending. */
export const anonymousAddressKey = addressKey;

/**
 * The user id of the anonymous callers from one address: `anon-` and 16 hex digits of an HMAC of the address key.
 * The id is shown to the client (hello), written to logs and stored with its conversations: keyed with a secret the
 * process never reveals, it names the address without disclosing it, and nobody can compute another address's id.
 */
export function anonymousUserId(key: Uint8Array, address: string): string {
  return `anon-${createHmac('sha256', key).update(anonymousAddressKey(address)).digest('hex').slice(0, ID_HEX_DIGITS)}`;
}
