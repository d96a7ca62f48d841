/**
 * The baseline of `npm run bench:chat`: a minimal raw uWebSockets.js server
 * that echoes every WebSocket message. Prints `port=N` when listening.
 */
import uWS from 'uWebSockets.js';
import { assertNativeUws } from '../src/transport/server.js';

assertNativeUws();
const app = uWS.App();
app.ws('/*', {
  maxPayloadLength: 64 * 1024,
  maxBackpressure: 1024 * 1024,
  idleTimeout: 120,
  message: (ws, message, isBinary) => {
    ws.send(message, isBinary);
  },
});
app.listen('127.0.0.1', 0, (socket) => {
  if (!socket) {
    console.error('echo server could not listen');
    process.exit(1);
  }
  console.log(`port=${uWS.us_socket_local_port(socket as unknown as uWS.us_socket)}`);
});
process.on('SIGTERM', () => process.exit(0));
