/**
 * What one finished task really costs in memory, next to what the retention budget charges for it
 * (src/chat/retention.ts): ended tasks of a given number of deltas are built as the chat service builds them,
 * kept in a registry map and a list, and the heap plus array buffers are compared before and after.
 *
 *   npm run bench:task-bytes
 */
import { retainedBytes } from '../src/chat/retention.js';
import { PumpScheduler, Task } from '../src/chat/task.js';
import { newTaskId } from '../src/db/chat-store.js';
import { printTable } from './bench-support.js';

const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error('run with node --expose-gc (npm run bench:task-bytes does)');

const WORDS = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota', 'kappa'];

// One per chat service, as there.
const pumps = new PumpScheduler();

function endedTask(i: number, deltas: number, twoByte: boolean): Task {
  const task = new Task(newTaskId(), `user-${i % 10}`, `conv_${i}_${Math.random().toString(36).slice(2)}`, performance.now(), Date.now(), true, pumps);
  for (let d = 0; d < deltas; d++) task.pushDelta(`${twoByte ? ' δ' : ' '}${WORDS[(i + d) % 10]}`, false);
  task.end(
    {
      type: 'chat.done',
      taskId: task.taskId,
      messageId: `msg_${Math.random().toString(36).slice(2)}`,
      finishReason: 'stop',
      usage: { promptTokens: 12, completionTokens: deltas },
      cached: true,
      timings: { queueMs: Math.random(), firstTokenMs: Math.random(), totalMs: Math.random() },
    },
    'done',
  );
  return task;
}

function measure(count: number, deltas: number, twoByte: boolean) {
  const memory = () => {
    gc?.();
    gc?.();
    const m = process.memoryUsage();
    return m.heapUsed + m.arrayBuffers;
  };
  const before = memory();
  const registry = new Map<string, Task>();
  const list: Task[] = [];
  let charged = 0;
  let chars = 0;
  for (let i = 0; i < count; i++) {
    const task = endedTask(i, deltas, twoByte);
    registry.set(task.taskId, task);
    list.push(task);
    charged += retainedBytes(task);
    chars += task.text.length;
  }
  const measured = (memory() - before) / count;
  return {
    kept: [registry, list],
    row: { deltas, twoByte, chars: Math.round(chars / count), measured: Math.round(measured), charged: Math.round(charged / count) },
  };
}

const kept: unknown[] = [];
const rows = [];
for (const [deltas, twoByte] of [
  [0, false],
  [1, false],
  [8, false],
  [64, false],
  [512, false],
  [512, true],
  [4096, false],
] as const) {
  const { kept: k, row } = measure(deltas >= 4096 ? 2000 : 20_000, deltas, twoByte);
  kept.push(k);
  rows.push(row);
}
printTable(
  'Bytes one finished task holds (heap + array buffers), measured and charged',
  ['deltas', 'text', 'chars', 'measured (B)', 'charged (B)'],
  rows.map((r) => [String(r.deltas), r.twoByte ? 'two-byte' : 'Latin-1', String(r.chars), String(r.measured), String(r.charged)]),
);
console.log(JSON.stringify({ bench: 'task-bytes', node: process.version, rows }));
