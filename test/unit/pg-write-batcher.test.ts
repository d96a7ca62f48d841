/**
 * The PostgreSQL group commit's transaction, on a stand-in for the `postgres` package that logs what is sent and
 * answered (each answer one event-loop turn after it was sent, in order, as over a connection): the round trips of
 * a commit are what the ack waits for.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Pg } from '../../src/db/pg.js';
import { createPgWriteBatcher } from '../../src/db/pg-write-batcher.js';
import { isConnectionLoss } from '../../src/db/storage-health.js';
import { AppError } from '../../src/protocol/index.js';

/**
 * A connection whose queries are lazy like the package's (sent on execute() or then()), answered a turn later.
 * `lost`: the connection resets as this statement is answered; what is sent on it afterwards never answers, as on
 * a reserved connection of the package.
 */
function fakePg(log: string[], refuse: (text: string) => boolean = () => false, lost: (text: string) => boolean = () => false): Pg {
  let closed = false;
  const waiting: (() => void)[] = [];
  const answerLater = (answer: () => void) => {
    waiting.push(answer);
    if (waiting.length > 1) return;
    setImmediate(() => {
      for (const a of waiting.splice(0)) a();
    });
  };
  const query = (text: string) => {
    let sent: Promise<unknown> | null = null;
    const send = () => {
      sent ??= new Promise((resolve, reject) => {
        log.push(`send ${text}`);
        if (closed) return;
        answerLater(() => {
          if (lost(text)) {
            closed = true;
            log.push(`reset ${text}`);
            reject(Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
            return;
          }
          log.push(`answer ${text}`);
          if (refuse(text)) reject(new AppError('forbidden', `refused: ${text}`));
          else resolve([]);
        });
      });
      return sent;
    };
    const q = {
      execute: () => {
        void send().catch(() => {});
        return q;
      },
      // biome-ignore lint/suspicious/noThenProperty: a lazy query is a thenable, as the package's are.
      then: (onFulfilled?: (v: unknown) => unknown, onRejected?: (e: unknown) => unknown) => send().then(onFulfilled, onRejected),
      catch: (onRejected: (e: unknown) => unknown) => send().catch(onRejected),
    };
    return q;
  };
  const conn = {
    unsafe: query,
    release: () => log.push('release'),
    // What the package's begin does: BEGIN, its answer, then the callback's statements, then COMMIT or ROLLBACK.
    begin: async (fn: (tx: unknown) => Promise<unknown>) => {
      await query('begin');
      try {
        const result = await fn(conn);
        await query('commit');
        return result;
      } catch (err) {
        await query('rollback');
        throw err;
      }
    },
  };
  // A connection reserved after one was lost is a new one.
  const reserve = async () => {
    closed = false;
    return conn;
  };
  return { ...conn, reserve } as unknown as Pg;
}

describe('PostgreSQL group commit', () => {
  it("sends a batch's statements right behind its BEGIN (no wait for BEGIN's answer), then COMMIT: two round trips", async () => {
    const log: string[] = [];
    const batcher = createPgWriteBatcher<string>(fakePg(log), async (tx, writes) => {
      await tx.unsafe(`insert ${writes.join(',')}`);
    });
    await Promise.all([batcher.enqueue('a'), batcher.enqueue('b')]);
    assert.deepEqual(log, ['send begin', 'send insert a,b', 'answer begin', 'answer insert a,b', 'send commit', 'answer commit', 'release']);
  });

  it('rolls a refused batch back and retries its writes one per transaction, so only the refused one fails', async () => {
    const log: string[] = [];
    const batcher = createPgWriteBatcher<string>(
      fakePg(log, (text) => text.startsWith('insert') && text.includes('bad')),
      async (tx, writes) => {
        await tx.unsafe(`insert ${writes.join(',')}`);
      },
    );
    const [good, bad] = await Promise.allSettled([batcher.enqueue('good'), batcher.enqueue('bad')]);
    assert.equal(good.status, 'fulfilled');
    assert.equal(bad.status, 'rejected');
    assert.deepEqual(log.slice(0, 6), ['send begin', 'send insert good,bad', 'answer begin', 'answer insert good,bad', 'send rollback', 'answer rollback']);
    assert.equal(log.filter((l) => l === 'answer commit').length, 1);
    assert.equal(log.filter((l) => l === 'answer rollback').length, 2);
    assert.equal(batcher.pending, 0);
  });

  it('a batch whose connection is lost rejects its writes at once and sends nothing more on that connection; the next batch commits', async () => {
    const log: string[] = [];
    let cut = true;
    const batcher = createPgWriteBatcher<string>(
      fakePg(
        log,
        () => false,
        (text) => cut && text.startsWith('insert'),
      ),
      async (tx, writes) => {
        await tx.unsafe(`insert ${writes.join(',')}`);
      },
    );
    const lost = await Promise.allSettled([batcher.enqueue('a'), batcher.enqueue('b')]);
    assert.deepEqual(
      lost.map((r) => r.status === 'rejected' && (r.reason as { code?: string }).code),
      ['ECONNRESET', 'ECONNRESET'],
    );
    assert.ok(!log.includes('send rollback'), log.join(' | '));
    assert.equal(batcher.pending, 0);
    cut = false;
    await batcher.enqueue('c');
    assert.ok(log.includes('answer commit'));
  });

  it("tells a lost connection from a statement's refusal, which leaves the connection open for its ROLLBACK", () => {
    for (const code of ['ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'CONNECTION_CLOSED', 'CONNECT_TIMEOUT', '08006', '57P01'])
      assert.equal(isConnectionLoss({ code }), true, code);
    for (const code of ['23505', '53100', '25006', 'ENOSPC']) assert.equal(isConnectionLoss({ code }), false, code);
    assert.equal(isConnectionLoss(new AppError('forbidden', 'not yours')), false);
    assert.equal(isConnectionLoss(new Error('no code')), false);
  });
});
