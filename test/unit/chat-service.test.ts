/**
 * The chat service's own rules, on real parts (SQLite store, LMDB cache, token buckets, the inline model pool) in a
 * temp dir: what must hold however the steps of sends racing in one tick interleave at their awaits.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import type { Identity } from '../../src/auth/identity.js';
import { createChatCache } from '../../src/cache/chat-cache.js';
import { openResponseCache } from '../../src/cache/response-cache.js';
import { createChatService, type ChatService, type SendResult } from '../../src/chat/chat-service.js';
import { createChatStore } from '../../src/db/chat-store.js';
import { Database } from '../../src/db/database.js';
import { migrate } from '../../src/db/migrate.js';
import { createChatLimits } from '../../src/limits/chat-limits.js';
import { createRateLimits, type RateLimits } from '../../src/limits/rate-limits.js';
import { createInlinePool, type InlineProvider } from '../../src/llm/inline-pool.js';
import type { ModelPool } from '../../src/llm/pool.js';
import { createMetrics } from '../../src/metrics/metrics.js';
import { AppError, type ServerMessage } from '../../src/protocol/index.js';

const WORDS = ['One', ' two', ' three', ' four'];

/** Model calls made, and those stopped by their abort signal. */
interface Calls {
  started: number;
  aborted: number;
}

/** A provider that streams WORDS, one every `delayMs`, and stops when its signal aborts. */
function wordsProvider(calls: Calls, delayMs: number): InlineProvider {
  return {
    async streamTo(_request, signal, onChunk) {
      calls.started++;
      try {
        for (const word of WORDS) {
          await sleep(delayMs, undefined, { signal });
          onChunk(word);
        }
      } catch (err) {
        calls.aborted++;
        throw err;
      }
      return { finishReason: 'stop', usage: { promptTokens: 3, completionTokens: WORDS.length }, usageSource: 'reported' };
    },
  };
}

interface Harness {
  chat: ChatService;
  calls: Calls;
  pool: ModelPool;
  rateLimits: RateLimits;
  db: Database;
  dbFile: string;
  /** Rows in `table`, read on a connection of its own: what is committed. */
  committed(table: 'messages' | 'tasks'): number;
}

async function harness(
  t: { after(fn: () => Promise<void> | void): void },
  options: { maxRunningPerUser?: number; chatsPerMinute?: number; modelTokensPerMinute?: number; slots?: number; maxQueue?: number; delayMs?: number } = {},
): Promise<Harness> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-service-'));
  const dbFile = path.join(dir, 'chat.sqlite');
  const db = new Database(dbFile);
  migrate(db);
  const store = createChatStore(db);
  const log = pino({ level: 'silent' });
  const calls: Calls = { started: 0, aborted: 0 };
  const pool = createInlinePool(wordsProvider(calls, options.delayMs ?? 5), {
    threads: 1,
    tasksPerWorker: options.slots ?? 8,
    maxQueue: options.maxQueue ?? 64,
    maxQueuedPerOwner: 64,
    taskTimeoutMs: 60_000,
  });
  const responseCache = openResponseCache({ path: path.join(dir, 'cache'), ttlMs: 60_000, maxBytes: 1 << 24 });
  const rateLimits = createRateLimits({
    messagesPerSecond: 1000,
    chatsPerMinute: options.chatsPerMinute ?? 1000,
    modelTokensPerMinute: options.modelTokensPerMinute ?? 1_000_000,
    maxConnectionsPerUser: 10,
    maxAnonymousUsers: 10,
  });
  const chat = createChatService({
    store,
    pool,
    // The dev provider's name: every request is cacheable, so identical ones share a key.
    cache: createChatCache({ cache: responseCache, provider: 'dev', backend: 'test', model: 'm', log }),
    limits: createChatLimits(rateLimits, () => {}),
    metrics: createMetrics(),
    log,
    provider: 'dev',
    model: 'm',
    contextMessages: 10,
    defaultMaxTokens: 32,
    capUnsetMaxTokens: false,
    taskRetentionMs: 60_000,
    taskRetentionMaxBytes: 1 << 20,
    maxRunningPerUser: options.maxRunningPerUser ?? 100,
  });
  t.after(async () => {
    await chat.close();
    await pool.close();
    await responseCache.close();
    rateLimits.close();
    await store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const reader = () => new Database(dbFile, { readonly: true });
  return {
    chat,
    calls,
    pool,
    rateLimits,
    db,
    dbFile,
    committed(table) {
      const other = reader();
      try {
        return (other.raw.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
      } finally {
        other.close();
      }
    },
  };
}

const user = (userId: string): Identity => ({ userId, role: 'consumer' });

/** Every message of a sent task's stream, to its end. */
function streamOf(sent: SendResult): Promise<ServerMessage[]> {
  assert.equal(sent.duplicate, false);
  if (sent.duplicate) throw new Error('a repeated send has no stream of its own');
  const messages: ServerMessage[] = [];
  return new Promise((resolve) => {
    sent
      .subscribe({
        congested: () => false,
        deliver(m) {
          messages.push(m);
          if (m.type === 'chat.done' || m.type === 'chat.error') resolve(messages);
          return true;
        },
      })
      .pump();
  });
}

const textOf = (messages: ServerMessage[]) => messages.flatMap((m) => (m.type === 'chat.delta' ? [m.text] : [])).join('');
const endOf = (messages: ServerMessage[]) => messages.at(-1) as ServerMessage & { type: string; finishReason?: string };
const codeOf = (r: PromiseSettledResult<unknown>) => (r.status === 'rejected' && r.reason instanceof AppError ? r.reason.code : r.status);

test('sends of one user racing in one tick pass the running cap only as far as it allows; the refused store nothing', async (t) => {
  const h = await harness(t, { maxRunningPerUser: 2 });
  const sends = Array.from({ length: 5 }, (_, i) => h.chat.send(user('racer'), { text: `question ${i}`, cache: 'bypass' }));
  const results = await Promise.allSettled(sends);
  assert.deepEqual(results.map(codeOf), ['fulfilled', 'fulfilled', 'rate_limited', 'rate_limited', 'rate_limited']);
  assert.equal(h.committed('messages'), 2);
  // Their ends free the places.
  for (const r of results) if (r.status === 'fulfilled') await streamOf(r.value);
  await assert.doesNotReject(h.chat.send(user('racer'), { text: 'after', cache: 'bypass' }));
});

test('identical sends racing in one tick share one model call, and none takes a place in the pool of its own', async (t) => {
  // One place in the pool in all: a send that reserved one for itself instead of joining would be refused overloaded.
  const h = await harness(t, { slots: 1, maxQueue: 0 });
  const sends = Array.from({ length: 8 }, (_, i) => h.chat.send(user(`crowd-${i}`), { text: 'the same question' }));
  const sent = await Promise.all(sends);
  assert.deepEqual(
    sent.map((s) => s.ack.status),
    Array.from({ length: 8 }, () => 'queued'),
  );
  const streams = await Promise.all(sent.map(streamOf));
  for (const s of streams) {
    assert.equal(textOf(s), WORDS.join(''));
    assert.equal(endOf(s).type, 'chat.done');
  }
  assert.equal(h.calls.started, 1);
});

test('a call others joined is still made when the send that opened it is refused by its own limits', async (t) => {
  const h = await harness(t, { chatsPerMinute: 1 });
  // The opener's one chat of the minute is used up.
  await streamOf(await h.chat.send(user('spent'), { text: 'earlier', cache: 'bypass' }));
  const [refused, joined] = await Promise.allSettled([
    h.chat.send(user('spent'), { text: 'shared question' }),
    h.chat.send(user('fresh'), { text: 'shared question' }),
  ]);
  assert.equal(codeOf(refused as PromiseSettledResult<unknown>), 'rate_limited');
  assert.equal(joined?.status, 'fulfilled');
  const stream = await streamOf((joined as PromiseFulfilledResult<SendResult>).value);
  assert.equal(endOf(stream).type, 'chat.done');
  assert.equal(textOf(stream), WORDS.join(''));
  assert.equal(h.calls.started, 2);
  assert.equal(h.calls.aborted, 0);
});

test('the ack comes after the commit: the question is readable on another connection when send resolves', async (t) => {
  const h = await harness(t);
  const sent = await h.chat.send(user('u1'), { text: 'stored first', cache: 'bypass' });
  assert.equal(h.committed('messages'), 1);
  assert.equal(h.committed('tasks'), 1);
  assert.equal((await h.chat.task(user('u1'), sent.ack.taskId)).taskId, sent.ack.taskId);
  await streamOf(sent);
});

test('refusals give back what they took: a pool place and model tokens, and a failed commit its place in the running count too', async (t) => {
  const h = await harness(t, { chatsPerMinute: 2, modelTokensPerMinute: 100, maxRunningPerUser: 1 });
  const tokens = () => h.rateLimits.peek('u1', 'tokens').remaining;
  const chats = () => h.rateLimits.peek('u1', 'chats').remaining;

  // Over the model token budget (another reservation holds it all): refused before a chat is taken from the
  // bucket; the pool place goes back.
  const held = h.rateLimits.reserveModelTokens('u1', 100);
  assert.ok(held.ok);
  await assert.rejects(h.chat.send(user('u1'), { text: 'too long', params: { maxTokens: 10 }, cache: 'bypass' }), { code: 'rate_limited' });
  assert.equal(chats(), 2);
  assert.equal(h.pool.stats().inFlight, 0);
  held.reservation.release();
  assert.equal(tokens(), 100);

  // A commit that fails: the model call started alongside it is cancelled, the tokens and the running place come back.
  h.db.raw.exec("CREATE TEMP TRIGGER refuse_messages BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;");
  await assert.rejects(h.chat.send(user('u1'), { text: 'not stored', params: { maxTokens: 10 }, cache: 'bypass' }), AppError);
  h.db.raw.exec('DROP TRIGGER refuse_messages;');
  assert.equal(tokens(), 100);
  assert.equal(h.committed('messages'), 0);
  const deadline = Date.now() + 5000;
  while (h.pool.stats().inFlight > 0 && Date.now() < deadline) await sleep(5);
  assert.equal(h.pool.stats().inFlight, 0);
  assert.equal(h.calls.started - h.calls.aborted, 0, 'the call was stopped');

  // With the one running place back, the user's next chat passes; the chat after it finds the bucket empty,
  // and its token reservation is given back whole.
  const sent = await h.chat.send(user('u1'), { text: 'stored', params: { maxTokens: 10 }, cache: 'bypass' });
  await streamOf(sent);
  const before = tokens();
  await assert.rejects(h.chat.send(user('u1'), { text: 'one too many', params: { maxTokens: 10 }, cache: 'bypass' }), { code: 'rate_limited' });
  // (The bucket refills meanwhile: at least what it had.)
  assert.ok(tokens() >= before, `${tokens()} tokens left, ${before} before`);
  assert.equal(h.pool.stats().inFlight, 0);
  assert.equal(h.committed('messages'), 2, 'the question and reply of the one chat that passed');
});
