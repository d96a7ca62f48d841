/**
 * An Express app with its own login that mounts chatwire at /chat:
 * `npm run build && node dist/examples/express-chat.js` (PORT, default 3000; CHATWIRE_DATA_DIR).
 *
 * POST /login with {"name": "ann"} sets the app's session cookie; chatwire knows the user by that cookie on every
 * transport (/chat/ws, /chat/socket.io/, /chat/v1/...), through the authenticate hook. No token to mint or pass:
 * the browser sends the cookie with the WebSocket upgrade and the socket.io handshake by itself.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import { createChatwire } from 'chatwire';

/** The app's sessions: session id → user name. A real app keeps them in its own store. */
const sessions = new Map<string, string>();

function sessionUser(cookie: string | undefined): string | undefined {
  const sid = /(?:^|;\s*)sid=([^;]+)/.exec(cookie ?? '')?.[1];
  return sid === undefined ? undefined : sessions.get(sid);
}

const app = express();
app.use(express.json());
app.post('/login', (req, res) => {
  const name: unknown = req.body?.name;
  if (typeof name !== 'string' || !/^[A-Za-z0-9_-]{1,32}$/.test(name)) {
    res.status(400).json({ error: 'name: 1 to 32 letters, digits, _ or -' });
    return;
  }
  const sid = randomBytes(18).toString('base64url');
  sessions.set(sid, name);
  res.cookie('sid', sid, { httpOnly: true, sameSite: 'lax' }).json({ user: name });
});
app.get('/', (req, res) => {
  const user = sessionUser(req.headers.cookie);
  res.type('text').send(user ? `Hello ${user}: chat at /chat/ws` : 'POST /login {"name": "..."} first');
});

const chatwire = createChatwire({
  dataDir: process.env.CHATWIRE_DATA_DIR ?? './data',
  authenticate: ({ headers }) => {
    const user = sessionUser(headers.cookie);
    return user === undefined ? null : { userId: user, role: 'consumer' };
  },
});
const server = http.createServer(app);
await chatwire.attach(server, { prefix: '/chat' });
server.listen(Number(process.env.PORT ?? 3000), () => {
  const { port } = server.address() as AddressInfo;
  console.log(`express app with chatwire at /chat on http://localhost:${port} (port=${port})`);
});

const stop = () => void chatwire.close().then(() => server.close(() => process.exit(0)));
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
