/**
 * SIGTERM while /ws and socket.io clients chat: the real process stops taking
 * connections, cancels the running tasks and stores them, flushes its writes,
 * closes the sockets, and exits 0 (so within CHATWIRE_SHUTDOWN_TIMEOUT_MS,
 * past which it exits 1) without losing an acknowledged message.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { DATABASE_FILE_NAME } from '../../src/db/data-file.js';
import { Ledger, startChatters, verifyLedger } from '../helpers/chat-ledger.js';
import { WsClient } from '../helpers/clients.js';
import { CRASH_SERVER_ENV } from '../helpers/crash-round.js';
import { startProcess } from '../helpers/process.js';
import { tempDataDir } from '../helpers/server.js';

test('SIGTERM under load drains: no new connections, running tasks end cancelled and stored, exit 0, nothing acknowledged lost', async (t) => {
  const dataDir = tempDataDir();
  t.after(() => fs.rmSync(dataDir, { recursive: true, force: true }));
  const env = { ...CRASH_SERVER_ENV, CHATWIRE_DATA_DIR: dataDir, CHATWIRE_DEV_TOKEN_DELAY_MS: '5', CHATWIRE_SHUTDOWN_TIMEOUT_MS: '10000' };
  const server = await startProcess(env);
  const ledger = new Ledger();
  // No client cancels: every chat.done `cancelled` comes from the shutdown.
  const chatters = await startChatters({
    base: server.http,
    clients: 12,
    socketIoEvery: 3,
    userPrefix: 'drain',
    ledger,
    inFlight: 2,
    cancelRate: 0,
    maxTokens: [20, 200],
  });
  // A reader that sees the whole shutdown from its own socket.
  const watcher = await WsClient.connect(server.ws, { user: 'watcher' });
  const long = await watcher.request({ type: 'chat.send', text: 'a reply longer than the shutdown', params: { maxTokens: 4000 }, cache: 'bypass' });
  assert.equal(long.type, 'chat.ack');
  await watcher.nextOfType('chat.delta');
  while (ledger.ended.size < 20) await sleep(20);

  server.child.kill('SIGTERM');
  const { end } = await watcher.collect(long.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.equal(end.finishReason, 'cancelled');
  // The listener closed before the tasks were cancelled: from now on a new connection is refused.
  await assert.rejects(WsClient.connect(server.ws, { user: 'latecomer' }), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'ECONNREFUSED');
    return true;
  });
  assert.equal(await watcher.closed, 1001);
  assert.deepEqual(await server.exited, { code: 0, signal: null });
  assert.match(server.output(), /"msg":"stopped"/);
  await chatters.close();
  assert.equal(chatters.dropped, 12);

  // Every acknowledged chat got its one end before its socket closed; a refusal during the drain stored nothing.
  const unanswered = [...ledger.acked.keys()].filter((taskId) => !ledger.ended.has(taskId));
  assert.deepEqual(unanswered, []);
  const ends = [...ledger.ended.values()];
  assert.deepEqual(
    ends.filter((e) => e.type !== 'chat.done'),
    [],
  );
  assert.ok(
    ends.some((e) => e.finishReason === 'cancelled'),
    'some chat was running when SIGTERM came',
  );
  assert.equal(ledger.duplicateEnds, 0);
  assert.equal(ledger.seqGaps, 0);
  for (const code of Object.keys(ledger.refused)) assert.equal(code, 'overloaded');

  // The stored state needs no recovery: every task is final, every acknowledged message and reply is there.
  const v = verifyLedger(path.join(dataDir, DATABASE_FILE_NAME), ledger);
  assert.equal(v.integrity, 'ok');
  assert.equal(v.unfinishedTasks, 0);
  assert.deepEqual(v.lostAcked, []);
  assert.deepEqual(v.lostReplies, []);
  assert.deepEqual(v.corruptConversations, []);
  assert.equal(v.replies, ledger.ended.size);
  t.diagnostic(
    `${v.acked} chats acknowledged, ${ends.filter((e) => e.finishReason === 'cancelled').length} cancelled by the shutdown, refused during the drain: ${JSON.stringify(ledger.refused)}`,
  );

  // The next start finds nothing to recover.
  const next = await startProcess(env);
  assert.doesNotMatch(next.output(), /marked failed/);
  assert.deepEqual(await next.stop(), { code: 0, signal: null });
});
