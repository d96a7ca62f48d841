import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { SQLITE_FILE } from '../../src/app.js';
import type { Identity } from '../../src/auth/identity.js';
import { Database } from '../../src/db/database.js';
import { createMarketplaceService, type MarketplaceService } from '../../src/marketplace/marketplace-service.js';
import { createSqliteMarketplaceStore } from '../../src/db/marketplace-queries.js';
import { seedMarketplace } from '../../src/db/marketplace-seed.js';
import { migrate } from '../../src/db/migrate.js';
import { serializePage, ServerMessageSchema, type SerializedPage } from '../../src/protocol/index.js';
import { connectSocketIO, emitWithAck } from '../helpers/clients.js';
import { startServer, tempDataDir, type TestServer } from '../helpers/server.js';

const CONSUMER = 'c_0000000001';

type LookupType = 'requests.list' | 'consumer.requests' | 'consumer.bookings';
interface Lookup {
  type: LookupType;
  /** The query as a frame's fields, and as the HTTP route with its query string. */
  fields: Record<string, unknown>;
  route: string;
  page: (service: MarketplaceService, caller: Identity) => Promise<SerializedPage>;
}

const LOOKUPS: Lookup[] = [
  {
    type: 'requests.list',
    fields: { status: 'open', limit: 7 },
    route: '/v1/requests?status=open&limit=7',
    page: (s, caller) => s.requestsListJson(caller, { status: 'open', limit: 7 }),
  },
  {
    type: 'consumer.requests',
    fields: { consumerId: CONSUMER, limit: 100 },
    route: `/v1/consumers/${CONSUMER}/requests?limit=100`,
    page: (s, caller) => s.consumerRequestsJson(caller, { consumerId: CONSUMER, limit: 100 }),
  },
  {
    type: 'consumer.bookings',
    fields: { consumerId: CONSUMER, limit: 3 },
    route: `/v1/consumers/${CONSUMER}/bookings?limit=3`,
    page: (s, caller) => s.consumerBookingsJson(caller, { consumerId: CONSUMER, limit: 3 }),
  },
];

/** The first text frame after the hello that answers `id`, as the client receives it. */
function rawReply(url: string, frame: Record<string, unknown>): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    socket.on('error', reject);
    socket.on('message', (data) => {
      const text = data.toString();
      const message = JSON.parse(text) as { type: string; id?: string };
      if (message.type === 'hello') socket.send(JSON.stringify(frame));
      else if (message.id === frame.id) {
        socket.close();
        resolve(text);
      }
    });
  });
}

describe('marketplace pages, serialized by SQLite, reach every transport whole', () => {
  let server: TestServer;
  let db: Database;
  let service: MarketplaceService;
  const caller: Identity = { userId: CONSUMER, role: 'consumer' };

  before(async () => {
    const dataDir = tempDataDir();
    db = new Database(path.join(dataDir, SQLITE_FILE));
    migrate(db);
    seedMarketplace(db, { consumers: 3, providers: 8, requests: 60, seed: 5 });
    service = createMarketplaceService({ store: createSqliteMarketplaceStore(db) });
    server = await startServer({}, dataDir);
  });
  after(async () => {
    service.close();
    db.close();
    await server.close();
  });

  test('the raw WebSocket frame is the page text with type and id around it, and a valid reply', async () => {
    for (const lookup of LOOKUPS) {
      const page = await lookup.page(service, caller);
      assert.ok((JSON.parse(page.itemsJson) as unknown[]).length > 0, `${lookup.type}: the seed gives the page items`);
      const text = await rawReply(`${server.ws}?user=${CONSUMER}`, { type: lookup.type, id: `q-${lookup.type}`, ...lookup.fields });
      assert.equal(text, serializePage(page, lookup.type, `q-${lookup.type}`), lookup.type);
      const parsed = ServerMessageSchema.safeParse(JSON.parse(text));
      assert.ok(parsed.success, `${lookup.type}: ${parsed.error?.message}`);
    }
  });

  test('socket.io answers the ack with the parsed page and, without an ack, emits the same page as an event', async () => {
    const socket = await connectSocketIO(server.http, { user: CONSUMER });
    try {
      for (const lookup of LOOKUPS) {
        const expected = { type: lookup.type, ...JSON.parse(serializePage(await lookup.page(service, caller))) };
        assert.deepEqual(await emitWithAck(socket, lookup.type, lookup.fields), expected, `${lookup.type} ack`);
        const before = socket.received.length;
        socket.emit(lookup.type, lookup.fields);
        for (let waited = 0; socket.received.length === before; waited++) {
          assert.ok(waited < 200, `${lookup.type}: no event`);
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        assert.deepEqual(socket.received.at(-1), expected, `${lookup.type} event`);
      }
    } finally {
      socket.close();
    }
  });

  test('the HTTP body is the page text', async () => {
    for (const lookup of LOOKUPS) {
      const res = await fetch(`${server.http}${lookup.route}${lookup.route.includes('?') ? '&' : '?'}user=${CONSUMER}`);
      assert.equal(res.status, 200, lookup.route);
      assert.equal(res.headers.get('content-type'), 'application/json');
      assert.equal(await res.text(), serializePage(await lookup.page(service, caller)), lookup.route);
    }
  });
});
