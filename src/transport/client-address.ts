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
