import { createHmac } from 'node:crypto';
import { isIP } from 'node:net';

/** Hex digits of the keyed hash in an anonymous user id: 64 bits, so two addresses share an id only by a 2^-64 chance. */
const ID_HEX_DIGITS = 16;

/** The eight 16-bit groups of an IPv6 address (zone dropped, `::` expanded, a dotted IPv4 tail split); null if it is not one. */
function ipv6Groups(address: string): number[] | null {
  const text = address.replace(/%.*$/, '');
  if (isIP(text) !== 6) return null;
  const [head = '', tail] = text.split('::') as [string, string | undefined];
  const parse = (part: string): number[] =>
    part === ''
      ? []
      : part.split(':').flatMap((group) => {
          if (!group.includes('.')) return [parseInt(group, 16)];
          const [a, b, c, d] = group.split('.').map(Number) as [number, number, number, number];
          return [(a << 8) | b, (c << 8) | d];
        });
  const left = parse(head);
  const right = tail === undefined ? [] : parse(tail);
  return [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
}

/**
 * Who an anonymous caller is, from its address: an IPv4 address as it is (an IPv4-mapped IPv6 address, in any
 * spelling, as its IPv4 address), an IPv6 address by its /64. One host, or one home network, is routinely given a
 * whole /64: keying the full address would hand one client 2^64 fresh users. Anything else (no address known) is
 * kept as given, so every such caller shares one user rather than each getting its own.
 */
export function anonymousAddressKey(address: string): string {
  const trimmed = address.trim().toLowerCase();
  if (isIP(trimmed) === 4) return trimmed;
  const groups = ipv6Groups(trimmed);
  if (groups === null) return trimmed;
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    const [hi = 0, lo = 0] = groups.slice(6);
    return `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
  }
  return `${groups
    .slice(0, 4)
    .map((g) => g.toString(16))
    .join(':')}::/64`;
}

/**
 * The user id of the anonymous callers from one address: `anon-` and 16 hex digits of an HMAC of the address key.
 * The id is shown to the client (hello), written to logs and stored with its conversations: keyed with a secret the
 * process never reveals, it names the address without disclosing it, and nobody can compute another address's id.
 */
export function anonymousUserId(key: Uint8Array, address: string): string {
  return `anon-${createHmac('sha256', key).update(anonymousAddressKey(address)).digest('hex').slice(0, ID_HEX_DIGITS)}`;
}
