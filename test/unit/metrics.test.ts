import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { createMetrics } from '../../src/metrics/metrics.js';

function sample(text: string, series: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  assert.ok(line, `${series} is exported`);
  return Number(line.slice(series.length + 1));
}

test('chatwire_event_loop_delay_seconds reports how long the loop was blocked, without the sampling period', async () => {
  const metrics = createMetrics();
  await sleep(100);
  await metrics.registry.metrics(); // starts a fresh window
  await sleep(50);
  // Block the loop for 80 ms: a timer due in that time runs at least ~70 ms late.
  const until = performance.now() + 80;
  while (performance.now() < until);
  await sleep(50);
  const text = await metrics.registry.metrics();
  const max = sample(text, 'chatwire_event_loop_delay_seconds{quantile="1"}');
  assert.ok(max >= 0.06, `max ${max} s covers the 80 ms block`);
  assert.ok(max < 1, `max ${max} s is in seconds`);
  const median = sample(text, 'chatwire_event_loop_delay_seconds{quantile="0.5"}');
  // The raw histogram's median on a mostly idle loop is the 10 ms period itself; this one is not.
  assert.ok(median < sample(text, 'nodejs_eventloop_lag_p50_seconds'), `median ${median} s is below the raw figure`);
});

test("process and Node.js metrics carry prom-client's standard names, chatwire's own the chatwire_ prefix", async () => {
  const metrics = createMetrics();
  const text = await metrics.registry.metrics();
  // The names dashboards and alerts for any Node.js service query.
  assert.ok(sample(text, 'process_resident_memory_bytes') > 0);
  assert.ok(sample(text, 'nodejs_heap_size_used_bytes') > 0);
  assert.ok(sample(text, 'process_cpu_seconds_total') >= 0);
  const names = (await metrics.registry.getMetricsAsJSON()).map((m) => m.name);
  const others = names.filter((name) => !/^(process|nodejs)_/.test(name));
  assert.ok(others.length > 0);
  for (const name of others) assert.match(name, /^chatwire_/);
  assert.ok(names.includes('chatwire_event_loop_delay_seconds'));
});

test('tallied counters: counts added on the hot path are exported once, per label value, on every read', async () => {
  const metrics = createMetrics();
  const ws = metrics.framesOut.tally('ws');
  const sio = metrics.framesOut.tally('socket.io');
  assert.equal(metrics.framesOut.tally('ws'), ws, 'one tally per label value');
  const deltas = metrics.deltasSent.tally();
  for (let i = 0; i < 5; i++) ws.inc();
  sio.inc();
  deltas.inc();
  deltas.inc();
  let text = await metrics.registry.metrics();
  assert.equal(sample(text, 'chatwire_frames_out_total{transport="ws"}'), 5);
  assert.equal(sample(text, 'chatwire_frames_out_total{transport="socket.io"}'), 1);
  assert.equal(sample(text, 'chatwire_deltas_sent_total'), 2);
  // A second read adds only what came since the first.
  ws.inc();
  text = await metrics.registry.metrics();
  assert.equal(sample(text, 'chatwire_frames_out_total{transport="ws"}'), 6);
  assert.equal(sample(text, 'chatwire_frames_out_total{transport="socket.io"}'), 1);
  assert.equal(sample(text, 'chatwire_deltas_sent_total'), 2);
  // The counter's own get() sees the tallies too.
  metrics.dbQueries.tally('chat.insert_message').inc();
  const got = await metrics.dbQueries.get();
  assert.deepEqual(
    got.values.map((v) => [v.labels.op, v.value]),
    [['chat.insert_message', 1]],
  );
});
