import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

describe('chat over raw /ws', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 2 });
  });
  after(() => server.close());

  test('hello is the first frame and names the user, provider and limits', async () => {
    const c = await WsClient.connect(server.ws, { user: 'alice' });
    const hello = await c.next();
    assert.equal(hello.type, 'hello');
    assert.equal(hello.userId, 'alice');
    assert.equal(hello.protocol, 1);
    assert.equal(hello.provider, 'dev');
    assert.equal(typeof hello.connectionId, 'string');
    assert.deepEqual(hello.limits, { maxFrameBytes: 65536, messagesPerSecond: 50, chatsPerMinute: 60 });
    await c.close();
  });

  test('without ?user the caller is the anonymous user of its address: every connection from it is the same user', async () => {
    const c = await WsClient.connect(server.ws);
    const d = await WsClient.connect(server.ws);
    const [hello, other] = [await c.nextOfType('hello'), await d.nextOfType('hello')];
    assert.match(hello.userId as string, /^anon-[0-9a-f]{16}$/);
    assert.notEqual(hello.connectionId, other.connectionId);
    assert.equal(other.userId, hello.userId);
    // The same user: a task started on one connection is readable on the other.
    const ack = await c.request({ type: 'chat.send', text: 'anonymous question' });
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    assert.equal((await d.request({ type: 'task.get', taskId: ack.taskId })).type, 'task');
    await c.close();
    await d.close();
  });

  test('the chatwire.v1 subprotocol is echoed when offered', async () => {
    const c = await WsClient.connect(server.ws, { user: 'alice', protocols: ['chatwire.v1'] });
    assert.equal(c.socket.protocol, 'chatwire.v1');
    await c.close();
  });

  test('a chat is acked before its first delta, deltas are contiguous, and the stored reply is their concatenation', async () => {
    const c = await WsClient.connect(server.ws, { user: 'bob' });
    c.send({ type: 'chat.send', id: 'q1', text: 'Can someone fix a leaking tap tomorrow?' });
    const first = await c.next((m) => m.type !== 'hello');
    assert.equal(first.type, 'chat.ack');
    assert.equal(first.id, 'q1');
    assert.equal(first.status, 'queued');
    assert.match(first.taskId as string, /^task_[0-9a-z]{9}[A-Za-z0-9_-]{22}$/);
    assert.deepEqual(Object.keys(first.rateLimit as object).sort(), ['limit', 'remaining', 'resetMs']);
    const { deltas, text, end } = await c.collect(first.taskId as string);
    assert.deepEqual(
      deltas.map((d) => d.seq),
      deltas.map((_, i) => i),
    );
    assert.equal(end.type, 'chat.done');
    assert.equal(end.finishReason, 'stop');
    assert.equal(end.cached, false);
    assert.equal((end.usage as { completionTokens: number }).completionTokens, 32);
    assert.equal(text.split(' ').length, 32);
    const history = await c.request({ type: 'conversation.history', conversationId: first.conversationId });
    assert.equal(history.type, 'conversation.history');
    const messages = history.messages as { role: string; text: string; messageId: string }[];
    assert.deepEqual(
      messages.map((m) => [m.role, m.text]),
      [
        ['user', 'Can someone fix a leaking tap tomorrow?'],
        ['assistant', text],
      ],
    );
    assert.equal(messages[0]?.messageId, first.messageId);
    assert.equal(messages[1]?.messageId, end.messageId);
    await c.close();
  });

  test('the dev provider gives the same text for the same request', async () => {
    const c = await WsClient.connect(server.ws, { user: 'carol' });
    const texts: string[] = [];
    for (let i = 0; i < 2; i++) {
      const ack = await c.request({ type: 'chat.send', text: 'Quote for painting a fence', cache: 'bypass' });
      texts.push((await c.collect(ack.taskId as string)).text);
    }
    assert.equal(texts[0], texts[1]);
    assert.ok((texts[0] as string).length > 0);
    await c.close();
  });

  test("the conversation's earlier messages are part of the model's context", async () => {
    const c = await WsClient.connect(server.ws, { user: 'dave' });
    const a = await c.request({ type: 'chat.send', text: 'hello', cache: 'bypass' });
    const alone = (await c.collect(a.taskId as string)).text;
    const b = await c.request({ type: 'chat.send', text: 'hello', conversationId: a.conversationId, cache: 'bypass' });
    const withContext = (await c.collect(b.taskId as string)).text;
    assert.notEqual(withContext, alone);
    const fresh = await c.request({ type: 'chat.send', text: 'hello', cache: 'bypass' });
    assert.equal((await c.collect(fresh.taskId as string)).text, alone);
    await c.close();
  });

  test('maxTokens bounds the reply and ends it with finishReason length', async () => {
    const c = await WsClient.connect(server.ws, { user: 'erin' });
    const ack = await c.request({ type: 'chat.send', text: 'short please', params: { maxTokens: 5 } });
    const { text, end } = await c.collect(ack.taskId as string);
    assert.equal(text.split(' ').length, 5);
    assert.equal(end.finishReason, 'length');
    assert.deepEqual(end.usage, { promptTokens: 2, completionTokens: 5 });
    await c.close();
  });

  test('task.get reports a finished task with its text', async () => {
    const c = await WsClient.connect(server.ws, { user: 'frank' });
    const ack = await c.request({ type: 'chat.send', text: 'status check' });
    const { text, deltas } = await c.collect(ack.taskId as string);
    const reply = await c.request({ type: 'task.get', taskId: ack.taskId });
    assert.equal(reply.type, 'task');
    const task = reply.task as Record<string, unknown>;
    assert.equal(task.taskId, ack.taskId);
    assert.equal(task.conversationId, ack.conversationId);
    assert.equal(task.status, 'done');
    assert.equal(task.seq, deltas.length);
    assert.equal(task.text, text);
    assert.ok(!Number.isNaN(Date.parse(task.createdAt as string)));
    await c.close();
  });

  test('conversation.history pages back with before', async () => {
    const c = await WsClient.connect(server.ws, { user: 'gina' });
    let conversationId: unknown;
    for (let i = 0; i < 3; i++) {
      const ack = await c.request({ type: 'chat.send', text: `message ${i}`, ...(conversationId ? { conversationId } : {}) });
      conversationId = ack.conversationId;
      await c.collect(ack.taskId as string);
    }
    const last = await c.request({ type: 'conversation.history', conversationId, limit: 2 });
    const page1 = last.messages as { messageId: string; role: string; text: string }[];
    assert.equal(last.hasMore, true);
    assert.deepEqual(
      page1.map((m) => m.role),
      ['user', 'assistant'],
    );
    assert.equal(page1[0]?.text, 'message 2');
    const older = await c.request({ type: 'conversation.history', conversationId, limit: 10, before: page1[0]?.messageId });
    const page2 = older.messages as { text: string; role: string }[];
    assert.equal(older.hasMore, false);
    assert.deepEqual(
      page2.filter((m) => m.role === 'user').map((m) => m.text),
      ['message 0', 'message 1'],
    );
    assert.equal(page2.length, 4);
    await c.close();
  });

  test("another user's conversation and task are forbidden", async () => {
    const owner = await WsClient.connect(server.ws, { user: 'owner' });
    const ack = await owner.request({ type: 'chat.send', text: 'private' });
    await owner.collect(ack.taskId as string);
    const other = await WsClient.connect(server.ws, { user: 'intruder' });
    for (const msg of [
      { type: 'conversation.history', conversationId: ack.conversationId },
      { type: 'task.get', taskId: ack.taskId },
      { type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 },
      { type: 'chat.cancel', taskId: ack.taskId },
      { type: 'chat.send', text: 'join in', conversationId: ack.conversationId },
    ]) {
      const reply = await other.request(msg);
      assert.equal(reply.type, 'error', JSON.stringify(msg));
      assert.equal(reply.code, 'forbidden', JSON.stringify(msg));
    }
    await owner.close();
    await other.close();
  });
});
