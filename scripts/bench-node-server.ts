/**
 * chatwire attached to a plain node:http server (/ws over the `ws` package, socket.io with io.attach, HTTP on
 * node:http), for bench:chat's node:http rows: the settings come from the environment as main.js reads them, and
 * the start line carries the port as main.js's does.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { pino } from 'pino';
import { createChatwire, optionsFromEnv } from '../src/index.js';

const options = optionsFromEnv();
const log = pino({ level: options.logLevel, base: { service: 'chatwire' } });
const chatwire = createChatwire({ ...options, logger: log });
const server = http.createServer((_req, res) => {
  res.statusCode = 404;
  res.end('not found');
});
await chatwire.attach(server);
server.listen(options.port, options.host, () => {
  const { port } = server.address() as AddressInfo;
  log.info({ port }, `chatwire on node:http listening on port ${port}`);
});
process.once('SIGTERM', () => void chatwire.close().then(() => server.close(() => process.exit(0))));
