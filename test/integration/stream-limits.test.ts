import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { readSse, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

type ErrorBody = { error: { code: string; message: string; retryAfterMs?: number } };

async function startChat(server: TestServer, user: string, text: string, maxTokens: number): Promise<{ taskId: string; conversationId: string }> {
  const res = await fetch(`${server.http}/v1/chat?user=${user}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text, params: { maxTokens }, cache: 'bypass' }),
  });
  assert.equal(res.status, 202);
  return (await res.json()) as { taskId: string; conversationId: string };
}

describe('SSE streams count toward the per-user connection cap', () => {
  let server: TestServer;
  before(async () => {
    // A slow task that stays running for the whole test; frames plentiful, so every 429 below is the cap's.
    server = await startServer({ maxConnectionsPerUser: 4, devTokenDelayMs: 40, messagesPerSecond: 100_000, chatsPerMinute: 1000 });
  });
  after(() => server.close());

  test('one user asking for a thousand streams of its running task holds its cap, and another user is served', async () => {
    const { taskId } = await startChat(server, 'streamer', 'a long one', 400);
    const ws = await WsClient.connect(server.ws, { user: 'streamer' });
    const held: AbortController[] = [];
    const open = async (): Promise<Response> => {
      const abort = new AbortController();
      const res = await fetch(`${server.http}/v1/tasks/${taskId}/stream?user=streamer`, { signal: abort.signal });
      if (res.status === 200) held.push(abort);
      else await res.text();
      return res;
    };
    const statuses = new Map<number, number>();
    for (let batch = 0; batch < 10; batch++) {
      const answers = await Promise.all(Array.from({ length: 100 }, open));
      for (const res of answers) statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
    }
    // The WebSocket holds one of the four slots: three streams.
    assert.equal(statuses.get(200), 3, JSON.stringify([...statuses]));
    assert.equal(statuses.get(429), 997);

    // Another user chats and streams meanwhile.
    const other = await WsClient.connect(server.ws, { user: 'other' });
    const ack = await other.request({ type: 'chat.send', text: 'meanwhile', params: { maxTokens: 4 } });
    assert.equal(ack.type, 'chat.ack');
    assert.equal((await other.collect(ack.taskId as string)).end.type, 'chat.done');
    const events = await readSse(await fetch(`${server.http}/v1/tasks/${ack.taskId as string}/stream?user=other`));
    assert.equal(events.at(-1)?.event, 'done');

    // A stream the client drops gives its slot back.
    held.pop()?.abort();
    let reopened: Response | undefined;
    for (let i = 0; i < 100 && reopened?.status !== 200; i++) {
      reopened = await open();
      if (reopened.status !== 200) await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(reopened?.status, 200);
    for (const a of held) a.abort();
    await Promise.all([ws.close(), other.close()]);
  });

  test('the 429 of a stream past the cap names the cap', async () => {
    const { taskId } = await startChat(server, 'capped', 'another long one', 400);
    const streams = await Promise.all(Array.from({ length: 4 }, () => fetch(`${server.http}/v1/tasks/${taskId}/stream?user=capped`)));
    assert.deepEqual(
      streams.map((r) => r.status),
      [200, 200, 200, 200],
    );
    const fifth = await fetch(`${server.http}/v1/tasks/${taskId}/stream?user=capped`);
    assert.equal(fifth.status, 429);
    const body = (await fifth.json()) as ErrorBody;
    assert.equal(body.error.code, 'rate_limited');
    assert.equal(body.error.message, 'too many connections for this user: 4 open, at most 4 allowed');
    // A WebSocket of the same user finds the cap taken by the streams.
    await assert.rejects(WsClient.connect(server.ws, { user: 'capped' }), /429/);
    await Promise.all(streams.map((r) => r.body?.cancel()));
  });
});

describe('replays and history are charged to a per-user egress bucket', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ egressBytesPerMinute: 64 * 1024, messagesPerSecond: 100_000, chatsPerMinute: 1000, modelTokensPerMinute: 1_000_000 });
  });
  after(() => server.close());

  test('resuming one long task over and over is refused with retryAfterMs once the bytes are spent; another user is not', async () => {
    const c = await WsClient.connect(server.ws, { user: 'replayer' });
    const ack = await c.request({ type: 'chat.send', text: 'a long reply to replay', params: { maxTokens: 400 }, cache: 'bypass' });
    const { text } = await c.collect(ack.taskId as string);
    const replyBytes = Buffer.byteLength(text);
    assert.ok(replyBytes > 2 * 1024, `the reply is long (${replyBytes} bytes)`);
    let replays = 0;
    let refusal: Record<string, unknown> | undefined;
    while (replays < 64 * 2) {
      const r = await c.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 });
      if (r.type === 'error') {
        refusal = r;
        break;
      }
      assert.equal(r.type, 'ok');
      await c.collect(ack.taskId as string);
      replays += 1;
    }
    assert.ok(refusal, 'a resume was refused');
    assert.equal(refusal.code, 'rate_limited');
    assert.ok((refusal.retryAfterMs as number) > 0);
    // The bucket's 64 KiB, plus what refills while the test runs (about 1 KiB a second).
    assert.ok(replays * replyBytes <= 72 * 1024, `${replays} replays of ${replyBytes} bytes passed`);
    // History over HTTP draws from the same bucket: what the refused resume left is soon spent too.
    let page: Response | undefined;
    for (let i = 0; i < 64 && page?.status !== 429; i++) {
      page = await fetch(`${server.http}/v1/conversations/${ack.conversationId as string}/messages?user=replayer`);
      await page.text();
    }
    assert.equal(page?.status, 429);
    assert.ok(Number(page.headers.get('retry-after')) >= 1);

    // Another user replays its own task.
    const o = await WsClient.connect(server.ws, { user: 'bystander' });
    const oack = await o.request({ type: 'chat.send', text: 'a long reply to replay', params: { maxTokens: 400 } });
    await o.collect(oack.taskId as string);
    assert.equal((await o.request({ type: 'chat.resume', taskId: oack.taskId, fromSeq: 0 })).type, 'ok');
    assert.equal((await o.collect(oack.taskId as string)).text, text);
    const history = await fetch(`${server.http}/v1/conversations/${oack.conversationId as string}/messages?user=bystander`);
    assert.equal(history.status, 200);
    await Promise.all([c.close(), o.close()]);
  });
});

describe('one long task resumed from hundreds of connections at once', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({
      egressBytesPerMinute: 256 * 1024,
      maxConnectionsPerUser: 1000,
      maxPendingPerAddress: 1000,
      messagesPerSecond: 100_000,
      chatsPerMinute: 1000,
      modelTokensPerMinute: 1_000_000,
    });
  });
  after(() => server.close());

  test('the replays pass only as far as the egress bucket allows, each whole, the rest refused; another user is served', async () => {
    const owner = await WsClient.connect(server.ws, { user: 'amplifier' });
    const ack = await owner.request({ type: 'chat.send', text: 'the longest reply', params: { maxTokens: 4096 }, cache: 'bypass' });
    const { text } = await owner.collect(ack.taskId as string);
    const replyBytes = Buffer.byteLength(text);
    assert.ok(replyBytes > 16 * 1024, `the reply is long (${replyBytes} bytes)`);

    const readers = await Promise.all(Array.from({ length: 300 }, () => WsClient.connect(server.ws, { user: 'amplifier' })));
    const outcomes = await Promise.all(
      readers.map(async (r) => {
        const answer = await r.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 });
        if (answer.type === 'error') return { refused: answer.code as string, text: '' };
        return { refused: null, text: (await r.collect(ack.taskId as string)).text };
      }),
    );
    const replayed = outcomes.filter((o) => o.refused === null);
    const refused = outcomes.filter((o) => o.refused !== null);
    // The bucket's 256 KiB (plus a few KiB refilled while the test runs) bounds what one user can pull.
    assert.ok(replayed.length >= 1, 'the first replays pass');
    assert.ok(replayed.length * replyBytes <= 272 * 1024, `${replayed.length} replays of ${replyBytes} bytes passed`);
    assert.equal(replayed.length + refused.length, 300);
    assert.ok(refused.every((o) => o.refused === 'rate_limited'));
    // Every replay that passed is the whole reply, byte for byte.
    assert.ok(replayed.every((o) => o.text === text));

    const other = await WsClient.connect(server.ws, { user: 'bystander' });
    const oack = await other.request({ type: 'chat.send', text: 'meanwhile', params: { maxTokens: 8 } });
    assert.equal(oack.type, 'chat.ack');
    assert.equal((await other.collect(oack.taskId as string)).end.type, 'chat.done');
    await Promise.all([owner.close(), other.close(), ...readers.map((r) => r.close())]);
  });
});
