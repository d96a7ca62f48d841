/**
 * Disk trouble, made for real at the OS level (no hook into our own parts):
 * - full: the data dir is a 16 MiB tmpfs that the test fills up (needs mount, i.e. root; skipped otherwise);
 * - not writable: the data dir and the SQLite files are made immutable with `chattr +i`, so the kernel refuses
 *   their writes with EPERM even for root (needs CAP_LINUX_IMMUTABLE; skipped otherwise). chmod would not do
 *   (root ignores permissions), nor would a read-only remount (refused while files are open for writing).
 * In both, /readyz turns 503 naming the disk, chats fail with a clear error instead of being acknowledged
 * and lost, and everything works again once the disk does.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { DATABASE_FILE_NAME } from '../../src/db/data-file.js';
import { Ledger, verifyLedger } from '../helpers/chat-ledger.js';
import { WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

const LIMITS = { messagesPerSecond: 1_000_000, chatsPerMinute: 1_000_000, modelTokensPerMinute: 1_000_000_000 };

function run(cmd: string, args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error?.message ?? ''}`.trim() };
}

async function readiness(server: TestServer): Promise<{ status: number; body: { status: string; failures?: Record<string, string> } }> {
  const res = await fetch(`${server.http}/readyz`);
  return { status: res.status, body: (await res.json()) as { status: string; failures?: Record<string, string> } };
}

/** Sends a chat and follows it to its end; records the ack and the end in the ledger. */
async function chat(c: WsClient, ledger: Ledger, text: string, conversationId?: string) {
  const reply = await c.request({ type: 'chat.send', text, cache: 'bypass', ...(conversationId ? { conversationId } : {}) });
  if (reply.type !== 'chat.ack') {
    ledger.refuse(reply.code as string);
    return { reply, end: undefined };
  }
  const taskId = reply.taskId as string;
  ledger.ack({ taskId, conversationId: reply.conversationId as string, messageId: reply.messageId as string, text });
  const { text: streamed, end } = await c.collect(taskId);
  ledger.end(taskId, {
    type: end.type as 'chat.done' | 'chat.error',
    messageId: end.messageId as string | undefined,
    code: end.code as string | undefined,
    text: streamed,
    complete: true,
  });
  return { reply, end };
}

/** Fills the file system holding `dir` until it refuses another byte; returns the filler files. */
function fillUp(dir: string): string[] {
  const files: string[] = [];
  for (const size of [1 << 20, 64 << 10, 4 << 10, 512, 1]) {
    const file = path.join(dir, `filler-${size}`);
    files.push(file);
    const fd = fs.openSync(file, 'w');
    const chunk = Buffer.alloc(size, 0x66);
    try {
      for (;;) fs.writeSync(fd, chunk);
    } catch (err) {
      assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
    } finally {
      fs.closeSync(fd);
    }
  }
  return files;
}

function mountTmpfs(t: TestContext, sizeMiB: number): string | null {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-disk-'));
  const mounted = run('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m`, 'tmpfs', dir]);
  if (!mounted.ok) {
    fs.rmSync(dir, { recursive: true, force: true });
    t.skip(`cannot mount a tmpfs here (${mounted.out}); the full-disk test needs root`);
    return null;
  }
  t.after(() => {
    run('umount', [dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

test('a full disk makes /readyz 503 and chats fail with a retryable storage error; nothing acknowledged is lost; it recovers when space returns', async (t) => {
  const mount = mountTmpfs(t, 16);
  if (mount === null) return;
  const dataDir = path.join(mount, 'data');
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 0, cacheMaxBytes: 1 << 20 }, dataDir);
  t.after(() => server.close());
  const ledger = new Ledger();
  const c = await WsClient.connect(server.ws, { user: 'disk' });
  assert.equal((await readiness(server)).status, 200);
  const before = await chat(c, ledger, 'before the disk fills');
  assert.equal(before.end?.type, 'chat.done');
  const conversationId = before.reply.conversationId as string;

  const fillers = fillUp(mount);
  const notReady = await readiness(server);
  assert.equal(notReady.status, 503);
  assert.match(notReady.body.failures?.disk ?? '', /disk full \(ENOSPC\)/);
  t.diagnostic(`readiness: ${notReady.body.failures?.disk}`);

  // SQLite may still fit a few commits in pages it already owns; keep asking until the disk says no.
  const big = 'x'.repeat(15_000);
  let refusal: Awaited<ReturnType<typeof chat>>['reply'] | undefined;
  const failedReplies = [];
  for (let i = 0; i < 200 && refusal === undefined; i++) {
    const { reply, end } = await chat(c, ledger, `${big} ${i}`, conversationId);
    if (reply.type === 'error') refusal = reply;
    else if (end?.type === 'chat.error') failedReplies.push(end);
  }
  assert.ok(refusal, 'the full disk refused no chat');
  assert.equal(refusal.code, 'overloaded');
  assert.match(refusal.message as string, /^storage unavailable: disk full \(SQLITE_FULL\); the message was not stored, retry later$/);
  // A question stored just before the disk filled may have no room for its reply: that ends in a clear chat.error.
  for (const end of failedReplies) {
    assert.equal(end.code, 'internal');
    assert.match(end.message as string, /^the reply could not be stored \(storage unavailable: disk full \(SQLITE_FULL\)\); the question is stored$/);
  }
  // Reads still work, and every acknowledged question is there.
  const during = await c.request({ type: 'conversation.history', conversationId, limit: 100 });
  const stored = new Set((during.messages as { messageId: string }[]).map((m) => m.messageId));
  for (const a of ledger.acked.values()) assert.ok(stored.has(a.messageId), `acknowledged message ${a.messageId} missing`);

  for (const f of fillers) fs.rmSync(f);
  assert.equal((await readiness(server)).status, 200);
  const after = await chat(c, ledger, 'after the disk has room again', conversationId);
  assert.equal(after.end?.type, 'chat.done');
  await c.close();
  await server.stop();

  const v = verifyLedger(path.join(dataDir, DATABASE_FILE_NAME), ledger);
  assert.equal(v.integrity, 'ok');
  assert.deepEqual(v.lostAcked, []);
  assert.deepEqual(v.lostReplies, []);
  assert.deepEqual(v.corruptConversations, []);
  t.diagnostic(
    `${ledger.acked.size} chats acknowledged around the full disk, ${failedReplies.length} replies refused, refusals ${JSON.stringify(ledger.refused)}`,
  );
});

function setImmutable(paths: string[], on: boolean): { ok: boolean; out: string } {
  return run('chattr', [on ? '+i' : '-i', ...paths]);
}

test('a data dir that stops being writable makes /readyz 503 and chats fail with a retryable storage error; it recovers when writable again', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 0 });
  t.after(() => server.close());
  const ledger = new Ledger();
  const c = await WsClient.connect(server.ws, { user: 'readonly' });
  const before = await chat(c, ledger, 'before the disk turns read-only');
  assert.equal(before.end?.type, 'chat.done');
  const conversationId = before.reply.conversationId as string;

  // The directories (no file can be created) and the SQLite database and WAL (no write reaches them). Files the
  // server maps into memory (SQLite's -shm, LMDB's) are left alone: a refused write through a shared mapping is
  // a SIGBUS that kills the process, which is not what a full or read-only disk does to a write() call.
  const db = path.join(server.dataDir, DATABASE_FILE_NAME);
  const everything = [server.dataDir, path.join(server.dataDir, 'cache'), db, `${db}-wal`];
  const locked = setImmutable(everything, true);
  if (!locked.ok) {
    t.skip(`chattr +i is not permitted here (${locked.out})`);
    return;
  }
  let unlocked = false;
  const unlock = () => {
    if (!unlocked) setImmutable(everything, false);
    unlocked = true;
  };
  t.after(unlock);

  const notReady = await readiness(server);
  assert.equal(notReady.status, 503);
  assert.match(notReady.body.failures?.disk ?? '', /the data dir cannot take writes: operation not permitted \(EPERM\)/);
  const refused = await chat(c, ledger, 'while the disk is read-only', conversationId);
  t.diagnostic(`readiness: ${notReady.body.failures?.disk}; chat: ${refused.reply.code} ${refused.reply.message}`);
  assert.equal(refused.reply.type, 'error');
  assert.equal(refused.reply.code, 'overloaded');
  assert.match(
    refused.reply.message as string,
    /^storage unavailable: (I\/O error \(SQLITE_IOERR\w*\)|database not writable \(SQLITE_READONLY\)); the message was not stored, retry later$/,
  );
  const during = await c.request({ type: 'conversation.history', conversationId });
  assert.deepEqual(
    (during.messages as { role: string; text: string }[]).map((m) => m.text),
    ['before the disk turns read-only', before.end?.type === 'chat.done' ? (ledger.ended.get(before.reply.taskId as string)?.text as string) : ''],
  );

  unlock();
  assert.equal((await readiness(server)).status, 200);
  const after = await chat(c, ledger, 'after the disk is writable again', conversationId);
  assert.equal(after.end?.type, 'chat.done');
  await c.close();
  await server.stop();
  const v = verifyLedger(path.join(server.dataDir, DATABASE_FILE_NAME), ledger);
  assert.equal(v.integrity, 'ok');
  assert.deepEqual(v.lostAcked, []);
  assert.deepEqual(v.lostReplies, []);
  assert.equal(v.messages, 4);
});
