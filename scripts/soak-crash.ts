/**
 * npm run soak:crash [-- --rounds 50 --minutes 0 --clients 8 --min-ms 200 --max-ms 3000 --seed 1 --keep]
 *
 * The crash soak: round after round on ONE data dir, the real chatwire process
 * takes chats from /ws and socket.io clients and is killed with SIGKILL at a
 * random moment; the files it leaves are checked (SQLite integrity_check and
 * foreign keys, every acknowledged message and every reply a chat.done
 * announced present with its text, conversations in order), then it is
 * restarted on the same data dir (ready, LMDB cache reopened or rebuilt,
 * interrupted tasks reported ended, a cache hit served) and stopped with SIGTERM.
 * Stops after --rounds rounds, or after --minutes minutes when that is set.
 * Prints a line per round, a table and one JSON line; exits 1 on any problem.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRandom } from '../src/db/marketplace-seed.js';
import { crashRound, crashRoundProblems } from '../test/helpers/crash-round.js';
import { parseArgs, printTable } from './bench-support.js';

const args = parseArgs({ rounds: '50', minutes: '0', clients: '8', 'min-ms': '200', 'max-ms': '3000', seed: '1', keep: 'false' });
const ROUNDS = Number(args.rounds);
const MINUTES = Number(args.minutes);
const CLIENTS = Number(args.clients);
const MIN_MS = Number(args['min-ms']);
const MAX_MS = Number(args['max-ms']);
const random = createRandom(Number(args.seed)).next;

const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-soak-crash-'));
const started = Date.now();
const deadline = MINUTES > 0 ? started + MINUTES * 60_000 : Infinity;
const totals = {
  rounds: 0,
  acked: 0,
  ended: 0,
  interrupted: 0,
  replies: 0,
  lostAcked: 0,
  lostReplies: 0,
  corruptConversations: 0,
  integrityFailures: 0,
  cacheRebuilt: 0,
  problemRounds: 0,
};
const refused: Record<string, number> = {};
const problems: string[] = [];

console.error(
  `soak:crash: data dir ${dataDir}; ${MINUTES > 0 ? `${MINUTES} min` : `${ROUNDS} rounds`}, ${CLIENTS} clients, kill after ${MIN_MS}..${MAX_MS} ms, seed ${args.seed}`,
);
for (let round = 0; MINUTES > 0 ? Date.now() < deadline : round < ROUNDS; round++) {
  const killAfterMs = MIN_MS + Math.floor(random() * (MAX_MS - MIN_MS + 1));
  const r = await crashRound({ dataDir, killAfterMs, clients: CLIENTS, random });
  const found = crashRoundProblems(r);
  totals.rounds++;
  totals.acked += r.acked;
  totals.ended += r.ended;
  totals.interrupted += r.afterCrash.unfinishedTasks;
  totals.replies += r.afterCrash.replies;
  totals.lostAcked += r.afterCrash.lostAcked.length + r.afterRestart.lostAcked.length;
  totals.lostReplies += r.afterCrash.lostReplies.length + r.afterRestart.lostReplies.length;
  totals.corruptConversations += r.afterCrash.corruptConversations.length + r.afterRestart.corruptConversations.length;
  totals.integrityFailures += Number(r.afterCrash.integrity !== 'ok') + Number(r.afterRestart.integrity !== 'ok');
  totals.cacheRebuilt += Number(r.cacheRebuilt);
  for (const [code, n] of Object.entries(r.refused)) refused[code] = (refused[code] ?? 0) + n;
  if (found.length > 0) {
    totals.problemRounds++;
    problems.push(...found.map((p) => `round ${round}: ${p}`));
  }
  console.error(
    `round ${String(round).padStart(3)}: kill at ${String(killAfterMs).padStart(4)} ms | ${String(r.acked).padStart(4)} acked, ${String(r.afterCrash.unfinishedTasks).padStart(3)} interrupted | ` +
      `integrity ${r.afterCrash.integrity} | lost ${r.afterCrash.lostAcked.length}/${r.afterCrash.lostReplies.length} | messages ${r.afterRestart.messages} | ` +
      `cache ${r.cacheRebuilt ? 'rebuilt' : 'reopened'} | ${found.length === 0 ? 'ok' : found.join('; ')}`,
  );
}
const minutes = (Date.now() - started) / 60_000;

printTable(
  `soak:crash — ${totals.rounds} SIGKILL rounds on one data dir in ${minutes.toFixed(1)} min (${CLIENTS} clients, 1/3 socket.io)`,
  [
    'rounds',
    'acked',
    'ended before kill',
    'interrupted',
    'replies checked',
    'lost acked',
    'lost replies',
    'corrupt convs',
    'integrity fails',
    'cache rebuilt',
    'refused',
    'problem rounds',
  ],
  [
    [
      totals.rounds,
      totals.acked,
      totals.ended,
      totals.interrupted,
      totals.replies,
      totals.lostAcked,
      totals.lostReplies,
      totals.corruptConversations,
      totals.integrityFailures,
      totals.cacheRebuilt,
      Object.entries(refused)
        .map(([k, v]) => `${k}:${v}`)
        .join(' ') || 'none',
      totals.problemRounds,
    ].map(String),
  ],
);
for (const p of problems.slice(0, 20)) console.log(`problem: ${p}`);
console.log(
  JSON.stringify({
    bench: 'soak-crash',
    seed: Number(args.seed),
    minutes: +minutes.toFixed(2),
    clients: CLIENTS,
    ...totals,
    refused,
    problems: problems.slice(0, 50),
  }),
);
if (args.keep !== 'true') fs.rmSync(dataDir, { recursive: true, force: true });
else console.error(`data dir kept: ${dataDir}`);
process.exit(problems.length === 0 ? 0 : 1);
