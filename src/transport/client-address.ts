import { isIP, SocketAddress } from 'node:net';

/**
 * `::ffff:127.0.0.1` and `127.0.0.1` are one client: compare and key IPv4 peers in their plain form. IPv6 addresses
 * in their canonical one: uWS writes a peer in full (`0000:0000:0000:0000:0000:ffff:7f00:0001` when listening on
 * `::`), which would never equal a proxy listed as `127.0.0.1` or `::1`.
 */
function plain(address: string): string {
  const trimmed = address.trim();
  const canonical = isIP(trimmed) === 6 ? new SocketAddress({ address: trimmed, family: 'ipv6' }).address : trimmed.toLowerCase();
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(canonical);
  return mapped ? (mapped[1] as string) : canonical;
}

/**
 * The address a request came from: the TCP peer, or, when the peer is one of the `trusted` proxies, the
 * right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries left of it are written by the
 * client and prove nothing). A malformed entry ends the walk at the hop that wrote it.
 */
export function clientAddress(peer: string, forwardedFor: string | undefined, trusted: readonly string[]): string {
  let address = plain(peer);
  if (trusted.length === 0 || forwardedFor === undefined) return address;
  const proxies = new Set(trusted.map(plain));
  const hops = forwardedFor.split(',');
  for (let i = hops.length - 1; i >= 0 && proxies.has(address); i--) {
    const hop = plain(hops[i] as string);
    if (isIP(hop) === 0) break;
    address = hop;
  }
  return address;
}

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
 * The key one client's address is counted under (the anonymous user, the places waiting to authenticate): an IPv4 address as it is (an IPv4-mapped IPv6 address, in any
 * spelling, as its IPv4 address), an IPv6 address by its /64. One host, or one home network, is routinely given a
 * whole /64: keying the full address would hand one client 2^64 fresh users. Anything else (no address known) is
 * kept as given, so every such caller shares one user rather than each getting its own.
 */
export function addressKey(address: string): string {
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
