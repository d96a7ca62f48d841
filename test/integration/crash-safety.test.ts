/**
 * The short version of the crash soak (scripts/soak-crash.ts runs it for as
 * many rounds as asked): the real process is killed with SIGKILL at random
 * moments while /ws and socket.io clients chat, and restarted on the same data dir.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';
import { crashRound, crashRoundProblems } from '../helpers/crash-round.js';
import { tempDataDir } from '../helpers/server.js';

const ROUNDS = 3;

test('SIGKILL at random moments loses no acknowledged message, corrupts no conversation, and the restart is clean', async (t) => {
  const dataDir = tempDataDir();
  t.after(() => fs.rmSync(dataDir, { recursive: true, force: true }));
  let acked = 0;
  let interrupted = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const killAfterMs = 300 + Math.floor(Math.random() * 1200);
    const r = await crashRound({ dataDir, killAfterMs });
    t.diagnostic(
      `round ${round}: killed after ${killAfterMs} ms; ${r.acked} acked, ${r.ended} ended before the kill, ` +
        `${r.afterCrash.unfinishedTasks} left unfinished by the kill, cache ${r.cacheRebuilt ? 'rebuilt' : 'reopened'}`,
    );
    assert.deepEqual(crashRoundProblems(r), []);
    assert.equal(r.afterCrash.integrity, 'ok');
    assert.deepEqual(r.afterCrash.lostAcked, []);
    assert.deepEqual(r.afterCrash.lostReplies, []);
    assert.equal(r.afterRestart.unfinishedTasks, 0);
    acked += r.acked;
    interrupted += r.afterCrash.unfinishedTasks;
  }
  // The rounds did kill the server with chats acknowledged and in flight, or they would check nothing.
  assert.ok(acked > 0, 'no chat was acknowledged before the kills');
  t.diagnostic(`${acked} acknowledged chats over ${ROUNDS} rounds, ${interrupted} interrupted by a kill`);
});
