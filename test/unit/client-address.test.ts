import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientAddress } from '../../src/transport/client-address.js';

test('without trusted proxies the peer is the client, whatever X-Forwarded-For says', () => {
  assert.equal(clientAddress('203.0.113.7', '198.51.100.1', []), '203.0.113.7');
  assert.equal(clientAddress('::ffff:127.0.0.1', undefined, []), '127.0.0.1');
});

test('addresses are compared in canonical form: a peer written in full (as uWS does when listening on ::) matches its proxy', () => {
  assert.equal(clientAddress('0000:0000:0000:0000:0000:ffff:7f00:0001', undefined, []), '127.0.0.1');
  assert.equal(clientAddress('0000:0000:0000:0000:0000:ffff:7f00:0001', '198.51.100.1', ['127.0.0.1']), '198.51.100.1');
  assert.equal(clientAddress('0000:0000:0000:0000:0000:0000:0000:0001', '198.51.100.1', ['::1']), '198.51.100.1');
  assert.equal(clientAddress('2001:0DB8:0000:0000:0000:0000:0000:0002', '2001:DB8::7', ['2001:db8::2']), '2001:db8::7');
});

test('behind a trusted proxy the right-most untrusted X-Forwarded-For hop is the client', () => {
  assert.equal(clientAddress('10.0.0.2', '198.51.100.1', ['10.0.0.2']), '198.51.100.1');
  // The left-most entries are the client's own words: a spoofed first hop is not believed.
  assert.equal(clientAddress('10.0.0.2', '1.2.3.4, 198.51.100.1', ['10.0.0.2']), '198.51.100.1');
  // Chained trusted proxies are walked through.
  assert.equal(clientAddress('10.0.0.2', '198.51.100.1, 10.0.0.3', ['10.0.0.2', '10.0.0.3']), '198.51.100.1');
  // A header from a peer that is not a trusted proxy is ignored.
  assert.equal(clientAddress('203.0.113.7', '198.51.100.1', ['10.0.0.2']), '203.0.113.7');
  // A malformed hop ends the walk at the proxy that wrote it.
  assert.equal(clientAddress('10.0.0.2', 'not-an-ip', ['10.0.0.2']), '10.0.0.2');
});
