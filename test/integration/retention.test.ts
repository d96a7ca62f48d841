import assert from 'node:assert/strict';
import { test } from 'node:test';
import { connectSocketIO, emitWithAck, WsClient } from '../helpers/clients.js';
import { metric, startServer, type TestServer } from '../helpers/server.js';

type Msg = Record<string, unknown> & { type: string };

// The smallest budget the setting takes; a 4,096-token dev reply costs about 40 KB of it.
const BUDGET = 1024 * 1024;
const LIMITS = { taskRetentionMaxBytes: BUDGET, chatsPerMinute: 100_000, messagesPerSecond: 100_000, modelTokensPerMinute: 100_000_000 };

/** A /ws client that also keeps every frame exactly as it arrived. */
async function rawClient(server: TestServer, user: string): Promise<{ c: WsClient; frames: string[] }> {
  const c = await WsClient.connect(server.ws, { user });
  const frames: string[] = [];
  c.socket.on('message', (data) => frames.push(data.toString()));
  return { c, frames };
}

/** The frames of one task (deltas and its end), as sent. */
function taskFrames(frames: string[], taskId: string): string[] {
  return frames.filter((f) => {
    const m = JSON.parse(f) as Msg;
    return m.taskId === taskId && (m.type === 'chat.delta' || m.type === 'chat.done' || m.type === 'chat.error');
  });
}

/** Cache hits of a 4,096-token reply, `count` of them: each leaves a finished task of about 40 KB behind. */
async function fillRetention(c: WsClient, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const ack = await c.request({ type: 'chat.send', text: 'fill the retention budget', params: { maxTokens: 4096 } });
    assert.equal(ack.type, 'chat.ack');
    await c.collect(ack.taskId as string);
  }
}

/** The data of an SSE body's events, as sent. */
async function sseData(server: TestServer, taskId: string, user: string, lastEventId?: number): Promise<string[]> {
  const headers: Record<string, string> = lastEventId === undefined ? {} : { 'last-event-id': String(lastEventId) };
  const res = await fetch(`${server.http}/v1/tasks/${taskId}/stream?user=${user}`, { headers });
  assert.equal(res.status, 200);
  const text = await res.text();
  return text
    .split('\n')
    .filter((l) => l.startsWith('data: '))
    .map((l) => l.slice(6));
}

async function resumeWs(c: WsClient, frames: string[], taskId: string, fromSeq: number): Promise<string[]> {
  const start = frames.length;
  const id = `resume-${fromSeq}`;
  assert.equal((await c.request({ type: 'chat.resume', id, taskId, fromSeq })).type, 'ok');
  await c.collect(taskId);
  // The ok goes out before the replay, also when the task had to be read from storage first.
  assert.equal((JSON.parse(frames[start] as string) as Msg).id, id);
  return taskFrames(frames.slice(start), taskId);
}

async function resumeSocketIO(server: TestServer, user: string, taskId: string, fromSeq: number): Promise<Msg[]> {
  const s = await connectSocketIO(server.http, { user });
  const ended = new Promise<void>((resolve) => {
    s.on('chat.done', (m: Msg) => m.taskId === taskId && resolve());
    s.on('chat.error', (m: Msg) => m.taskId === taskId && resolve());
  });
  assert.equal((await emitWithAck(s, 'chat.resume', { taskId, fromSeq })).type, 'ok');
  await ended;
  s.close();
  return s.received.filter((m) => m.taskId === taskId && (m.type === 'chat.delta' || m.type === 'chat.done' || m.type === 'chat.error'));
}

test('finished tasks stay within CHATWIRE_TASK_RETENTION_MAX_BYTES however many there are, and a user is still served', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 0 });
  t.after(() => server.close());
  const { c } = await rawClient(server, 'flooder');
  // 80 retained replays of about 40 KB each would be over 3 MB without a budget.
  await fillRetention(c, 80);
  const retained = await metric(server, 'chatwire_retained_task_bytes');
  assert.ok(retained <= BUDGET, `retained ${retained} bytes, over the budget of ${BUDGET}`);
  assert.ok(retained > BUDGET / 2, `retained ${retained} bytes: the budget is used, not emptied`);
  const other = await WsClient.connect(server.ws, { user: 'someone-else' });
  const ack = await other.request({ type: 'chat.send', text: 'still served?', cache: 'bypass' });
  assert.equal((await other.collect(ack.taskId as string)).end.type, 'chat.done');
  await other.close();
  await c.close();
});

test('a task dropped from memory by the budget resumes from storage over /ws, socket.io and SSE with the frames it streamed live, and task.get agrees', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 1, devFaults: true });
  t.after(() => server.close());
  const { c, frames } = await rawClient(server, 'ret');
  // A model run (its chunk boundaries are the model's), a cache hit of it (the cached boundaries), a cancelled run
  // and a failed one.
  const run = await c.request({ type: 'chat.send', text: 'keep my stream', params: { maxTokens: 300 } });
  await c.collect(run.taskId as string);
  const hit = await c.request({ type: 'chat.send', text: 'keep my stream', params: { maxTokens: 300 } });
  assert.equal(hit.status, 'cached');
  await c.collect(hit.taskId as string);
  const stopped = await c.request({ type: 'chat.send', text: 'stop me midway', params: { maxTokens: 4000 }, cache: 'bypass' });
  await c.nextOfType('chat.delta', (m) => m.taskId === stopped.taskId && (m.seq as number) >= 5);
  await c.request({ type: 'chat.cancel', taskId: stopped.taskId });
  await c.collect(stopped.taskId as string);
  const failed = await c.request({ type: 'chat.send', text: '/fault upstream', cache: 'bypass' });
  assert.equal((await c.collect(failed.taskId as string)).end.code, 'upstream_error');

  const ids = [run.taskId, hit.taskId, stopped.taskId, failed.taskId] as string[];
  const live = new Map(ids.map((id) => [id, taskFrames(frames, id)]));
  const infos = new Map<string, unknown>();
  for (const id of ids) infos.set(id, (await c.request({ type: 'task.get', taskId: id })).task);
  assert.ok((live.get(run.taskId as string)?.length ?? 0) > 10, 'the model run streamed many deltas');
  assert.equal(JSON.parse(live.get(stopped.taskId as string)?.at(-1) as string).finishReason, 'cancelled');

  await fillRetention(c, 60);
  assert.ok((await metric(server, 'chatwire_retained_task_bytes')) <= BUDGET);

  for (const id of ids) {
    const expected = live.get(id) as string[];
    assert.deepEqual(await resumeWs(c, frames, id, 0), expected, `/ws resume of ${id} from 0`);
    assert.deepEqual(await resumeWs(c, frames, id, 3), expected.length > 3 ? expected.slice(3) : expected.slice(-1), `/ws resume of ${id} from 3`);
    assert.deepEqual(await sseData(server, id, 'ret'), expected, `SSE of ${id}`);
    assert.deepEqual(await sseData(server, id, 'ret', 4), expected.length > 5 ? expected.slice(5) : expected.slice(-1), `SSE of ${id} after Last-Event-ID 4`);
    const sio = await resumeSocketIO(server, 'ret', id, 2);
    assert.deepEqual(
      sio,
      (expected.length > 2 ? expected.slice(2) : expected.slice(-1)).map((f) => JSON.parse(f) as Msg),
      `socket.io resume of ${id}`,
    );
    assert.deepEqual((await c.request({ type: 'task.get', taskId: id })).task, infos.get(id), `task.get of ${id}`);
  }
  // Another user's task stays theirs, from storage too.
  const intruder = await WsClient.connect(server.ws, { user: 'intruder' });
  const refused = await intruder.request({ type: 'chat.resume', taskId: run.taskId, fromSeq: 0 });
  assert.equal(refused.code, 'forbidden');
  await intruder.close();
  await c.close();

  // The stored rows are enough: after a restart on the same data dir, within the window, the same frames.
  await server.stop();
  const again = await startServer({ ...LIMITS }, server.dataDir);
  t.after(() => again.close());
  const after = await rawClient(again, 'ret');
  for (const id of ids) {
    assert.deepEqual(await resumeWs(after.c, after.frames, id, 0), live.get(id), `/ws resume of ${id} after a restart`);
    assert.deepEqual((await after.c.request({ type: 'task.get', taskId: id })).task, infos.get(id), `task.get of ${id} after a restart`);
  }
  await after.c.close();
});

test('past CHATWIRE_MAX_RUNNING_PER_USER chats in flight, chat.send is rate_limited with retryAfterMs and stores nothing; other users are served', async (t) => {
  const server = await startServer({ maxRunningPerUser: 2, devTokenDelayMs: 20, chatsPerMinute: 1000 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'busy' });
  const long = { params: { maxTokens: 2000 }, cache: 'bypass' };
  const first = await c.request({ type: 'chat.send', text: 'long task 1', ...long });
  const conversationId = first.conversationId;
  const [second, third] = await Promise.all([2, 3].map((i) => c.request({ type: 'chat.send', text: `long task ${i}`, conversationId, ...long })));
  assert.equal(first.type, 'chat.ack');
  assert.equal(second?.type, 'chat.ack');
  assert.equal(third?.type, 'error');
  assert.equal(third?.code, 'rate_limited');
  assert.ok(typeof third?.retryAfterMs === 'number' && third.retryAfterMs > 0, `retryAfterMs ${String(third?.retryAfterMs)}`);

  const other = await WsClient.connect(server.ws, { user: 'calm' });
  const ack = await other.request({ type: 'chat.send', text: 'hello', cache: 'bypass' });
  assert.equal(ack.type, 'chat.ack');
  assert.equal((await other.collect(ack.taskId as string)).end.type, 'chat.done');

  // A chat that ends frees its place.
  await c.request({ type: 'chat.cancel', taskId: first.taskId });
  await c.collect(first.taskId as string);
  const fourth = await c.request({ type: 'chat.send', text: 'long task 4', conversationId, ...long });
  assert.equal(fourth.type, 'chat.ack');
  for (const m of [second, fourth]) {
    await c.request({ type: 'chat.cancel', taskId: m?.taskId });
    await c.collect(m?.taskId as string);
  }
  const history = await c.request({ type: 'conversation.history', conversationId });
  const asked = (history.messages as { role: string; text: string }[]).filter((m) => m.role === 'user').map((m) => m.text);
  assert.deepEqual(asked, ['long task 1', 'long task 2', 'long task 4'], 'the refused chat stored nothing');
  await other.close();
  await c.close();
});
