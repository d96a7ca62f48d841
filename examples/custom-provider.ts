/**
 * chatwire on its own port with a provider of your own: `npm run build && node dist/examples/custom-provider.js`,
 * then open http://localhost:8080 (PORT and CHATWIRE_DATA_DIR change the port and where the chats are kept).
 * The provider echoes the user's message back, word by word.
 */
import { createChatwire } from 'chatwire';

const chatwire = createChatwire({
  dataDir: process.env.CHATWIRE_DATA_DIR ?? './data',
  provider: {
    name: 'echo',
    async *stream(request) {
      for (const word of (request.messages.at(-1)?.content ?? '').split(' ')) yield `${word} `;
    },
  },
});
const port = await chatwire.listen({ port: Number(process.env.PORT ?? 8080) });
console.log(`chatwire with the echo provider on http://localhost:${port} (port=${port})`);

process.once('SIGTERM', () => void chatwire.close().then(() => process.exit(0)));
process.once('SIGINT', () => void chatwire.close().then(() => process.exit(0)));
