import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { NodeResponse } from '../../src/transport/node-http.js';

/** Two requests on one keep-alive agent to a server ending each answer with `closeConnection`; how many sockets served them. */
async function socketsUsed(closeConnection: boolean): Promise<{ sockets: number; connection: (string | undefined)[] }> {
  const server = http.createServer((req, res) => {
    new NodeResponse(req, res).writeStatus('503 Service Unavailable').end('refused', closeConnection);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const seen = new Set<unknown>();
  const connection: (string | undefined)[] = [];
  for (let i = 0; i < 2; i++) {
    await new Promise<void>((resolve, reject) => {
      const req = http.get({ host: '127.0.0.1', port: (server.address() as AddressInfo).port, agent }, (res) => {
        seen.add(res.socket);
        connection.push(res.headers.connection);
        res.resume();
        res.on('end', resolve);
      });
      req.on('error', reject);
    });
  }
  agent.destroy();
  await new Promise((r) => server.close(r));
  return { sockets: seen.size, connection };
}

test('NodeResponse.end with closeConnection closes the keep-alive connection after the answer; without, keeps it', async () => {
  const closed = await socketsUsed(true);
  assert.deepEqual(closed.connection, ['close', 'close']);
  assert.equal(closed.sockets, 2);
  const kept = await socketsUsed(false);
  assert.deepEqual(kept.connection, ['keep-alive', 'keep-alive']);
  assert.equal(kept.sockets, 1);
});
