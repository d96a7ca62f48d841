/**
 * One crash round: the real server process takes chats from /ws and socket.io
 * clients, is killed with SIGKILL at a chosen moment, and is checked: the
 * SQLite file passes integrity_check and holds every acknowledged message and
 * every reply a chat.done announced, in order; the restarted process on the
 * same data dir is ready (LMDB cache opened or rebuilt), reports the tasks the
 * dead process left as ended, serves chats and cache hits, and stops cleanly.
 * The crash-safety test runs a few rounds; scripts/soak-crash.ts runs many.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import WebSocket from 'ws';
import { type ChatwireClient, connect, type WebSocketConstructor } from '../../src/client/client.js';
import { DATABASE_FILE_NAME } from '../../src/db/data-file.js';
import { Ledger, startChatters, verifyLedger, type Verification } from './chat-ledger.js';
import { startProcess } from './process.js';

export const CRASH_SERVER_ENV: Record<string, string> = {
  CHATWIRE_DEV_TOKEN_DELAY_MS: '2',
  CHATWIRE_MESSAGES_PER_SECOND: '1000000',
  CHATWIRE_CHATS_PER_MINUTE: '1000000',
  CHATWIRE_MODEL_TOKENS_PER_MINUTE: '1000000000',
  CHATWIRE_MAX_CONNECTIONS_PER_USER: '1000',
};

export interface CrashRoundOptions {
  dataDir: string;
  /** How long the clients chat before the SIGKILL. */
  killAfterMs: number;
  clients?: number;
  socketIoEvery?: number;
  random?: () => number;
  env?: Record<string, string>;
}

export interface CrashRoundResult {
  killAfterMs: number;
  acked: number;
  ended: number;
  refused: Record<string, number>;
  duplicateEnds: number;
  seqGaps: number;
  /** Checked on a copy of the files the killed process left (the restart then recovers the originals itself). */
  afterCrash: Verification;
  /** Acknowledged tasks without a chat.done/chat.error before the kill whose stored status after the restart is not final. */
  notEndedAfterRestart: number;
  restartReady: boolean;
  /** The restarted process found the LMDB cache unreadable and started it empty. */
  cacheRebuilt: boolean;
  /** A cacheable question asked twice after the restart: the second was served from the cache. */
  cacheServes: boolean;
  cleanStopCode: number | null;
  /** Checked again after the restarted process stopped. */
  afterRestart: Verification;
}

/**
 * Checks a copy of the files the killed process left (database and WAL), so
 * that the restart, not the check, is the first to recover them.
 */
function verifyCopy(file: string, ledger: Ledger): Verification {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-crash-copy-'));
  try {
    const copy = path.join(scratch, path.basename(file));
    for (const suffix of ['', '-wal']) if (fs.existsSync(file + suffix)) fs.copyFileSync(file + suffix, copy + suffix);
    return verifyLedger(copy, ledger);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** A client of the restarted server, on chatwire's client library; a dropped socket fails its calls instead of being replaced. */
function connectClient(ws: string, user: string): ChatwireClient {
  return connect(ws, { user, WebSocket: WebSocket as unknown as WebSocketConstructor, reconnect: false, heartbeatMs: 0 });
}

/** Asks one cacheable question until it is served from the cache (the cache write follows the reply): whether the cache works. */
async function probeCache(probe: ChatwireClient, random: () => number): Promise<boolean> {
  const question = `is the cache alive after a crash? ${Math.floor(random() * 1e9)}`;
  const first = await probe.chat.send(question);
  const firstEnd = await first.result.then(
    () => 'done',
    () => 'error',
  );
  let second = await probe.chat.send(question);
  for (let i = 0; i < 20 && second.ack.status !== 'cached'; i++) {
    await second.result.catch(() => {});
    await sleep(50);
    second = await probe.chat.send(question);
  }
  await second.result.catch(() => {});
  return firstEnd === 'done' && second.ack.status === 'cached';
}

export async function crashRound(options: CrashRoundOptions): Promise<CrashRoundResult> {
  const env = { ...CRASH_SERVER_ENV, CHATWIRE_DATA_DIR: options.dataDir, ...options.env };
  const file = path.join(options.dataDir, DATABASE_FILE_NAME);
  const ledger = new Ledger();

  const victim = await startProcess(env);
  try {
    const chatters = await startChatters({
      base: victim.http,
      clients: options.clients ?? 8,
      socketIoEvery: options.socketIoEvery ?? 3,
      userPrefix: 'crash',
      ledger,
      inFlight: 2,
      ...(options.random ? { random: options.random } : {}),
    });
    await sleep(options.killAfterMs);
    await victim.kill();
    await chatters.close();
  } finally {
    // Also when the clients could not start: no process outlives its round.
    await victim.kill();
  }

  const afterCrash = verifyCopy(file, ledger);

  const restarted = await startProcess(env);
  let restartReady = false;
  let notEndedAfterRestart = 0;
  let cacheServes = false;
  try {
    restartReady = (await fetch(`${restarted.http}/readyz`)).status === 200;
    const notEnded = [...ledger.acked.values()].filter((a) => !ledger.ended.has(a.taskId));
    // Task lookups are per user; the ledger does not keep users, so ask as each crash user until one owns the task.
    const users = Array.from({ length: options.clients ?? 8 }, (_, i) => `crash-${i}`);
    const clients = users.map((user) => connectClient(restarted.ws, user));
    try {
      await Promise.all(clients.map((c) => c.ready()));
      for (const chat of notEnded) {
        let status: string | undefined;
        for (const c of clients) {
          // Another user's task is not_found for this one: ask the next.
          const task = await c.task(chat.taskId).catch(() => undefined);
          if (task) {
            status = task.status;
            break;
          }
        }
        if (status !== 'done' && status !== 'cancelled' && status !== 'error') notEndedAfterRestart++;
      }
      // A refused or lost chat.send means the restarted server does not serve: reported, not thrown.
      cacheServes = await probeCache(clients[0] as ChatwireClient, options.random ?? Math.random).catch(() => false);
    } finally {
      for (const c of clients) c.close();
    }
  } finally {
    await restarted.stop();
  }
  const { code } = await restarted.exited;
  const afterRestart = verifyLedger(file, ledger);
  return {
    killAfterMs: options.killAfterMs,
    acked: ledger.acked.size,
    ended: ledger.ended.size,
    refused: ledger.refused,
    duplicateEnds: ledger.duplicateEnds,
    seqGaps: ledger.seqGaps,
    afterCrash,
    notEndedAfterRestart,
    restartReady,
    cacheRebuilt: /response cache store unreadable; starting empty/.test(restarted.output()),
    cacheServes,
    cleanStopCode: code,
    afterRestart,
  };
}

/** The problems a round found; empty when every promise held. */
export function crashRoundProblems(r: CrashRoundResult): string[] {
  const problems: string[] = [];
  for (const [when, v] of [
    ['after the crash', r.afterCrash],
    ['after the restart', r.afterRestart],
  ] as const) {
    if (v.integrity !== 'ok') problems.push(`integrity_check ${when}: ${v.integrity}`);
    if (v.foreignKeyViolations > 0) problems.push(`${v.foreignKeyViolations} foreign key violations ${when}`);
    if (v.lostAcked.length > 0) problems.push(`${v.lostAcked.length} acknowledged messages missing ${when}: ${v.lostAcked.slice(0, 3).join(', ')}`);
    if (v.lostReplies.length > 0) problems.push(`${v.lostReplies.length} announced replies missing ${when}: ${v.lostReplies.slice(0, 3).join(', ')}`);
    if (v.corruptConversations.length > 0) problems.push(`${v.corruptConversations.length} conversations out of order ${when}`);
  }
  if (r.afterRestart.unfinishedTasks > 0) problems.push(`${r.afterRestart.unfinishedTasks} tasks still queued/running after the restart`);
  if (r.notEndedAfterRestart > 0) problems.push(`${r.notEndedAfterRestart} interrupted tasks not reported ended after the restart`);
  if (r.duplicateEnds > 0) problems.push(`${r.duplicateEnds} tasks ended twice`);
  if (r.seqGaps > 0) problems.push(`${r.seqGaps} delta seq gaps`);
  if (!r.restartReady) problems.push('the restarted server was not ready');
  if (!r.cacheServes) problems.push('the restarted server did not serve a cache hit');
  if (r.cleanStopCode !== 0) problems.push(`the restarted server exited ${r.cleanStopCode} on SIGTERM`);
  return problems;
}
