import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type LabelValues } from 'prom-client';

// Node's event-loop delay histogram records the time between two firings of a timer of this period, so every
// value holds the period itself (an idle loop reads 10 ms). chatwire's own gauge subtracts it.
const EVENT_LOOP_RESOLUTION_MS = 10;

const LATENCY_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * The process's Prometheus registry and every figure chatwire exports. One
 * instance per server (no prom-client global registry), so tests can run
 * several servers in one process.
 */
export function createMetrics() {
  const registry = new Registry();
  // No prefix: the process and Node.js series keep prom-client's standard names, which existing dashboards and alerts query.
  collectDefaultMetrics({ register: registry });
  const m = {
    registry,
    connections: new Gauge({ name: 'chatwire_connections', help: 'Open WebSocket connections', labelNames: ['transport'], registers: [registry] }),
    framesIn: talliedCounter({ name: 'chatwire_frames_in_total', help: 'Messages received from clients', labelName: 'transport', registry }),
    framesOut: talliedCounter({ name: 'chatwire_frames_out_total', help: 'Messages sent to clients', labelName: 'transport', registry }),
    ackLatency: new Histogram({
      name: 'chatwire_ack_latency_seconds',
      help: 'From a chat.send arriving to its chat.ack going out (includes the group commit)',
      buckets: LATENCY_BUCKETS_S,
      registers: [registry],
    }),
    firstToken: new Histogram({
      name: 'chatwire_time_to_first_token_seconds',
      help: 'From a chat.send arriving to its first delta',
      labelNames: ['cached'],
      buckets: LATENCY_BUCKETS_S,
      registers: [registry],
    }),
    tokensStreamed: new Counter({ name: 'chatwire_tokens_streamed_total', help: 'Completion tokens streamed to tasks', registers: [registry] }),
    deltasSent: talliedCounter({ name: 'chatwire_deltas_sent_total', help: 'chat.delta frames sent to subscribers', registry }),
    queueDepth: new Gauge({ name: 'chatwire_queue_depth', help: 'Model calls waiting for a worker', registers: [registry] }),
    modelCallsInFlight: new Gauge({ name: 'chatwire_model_calls_in_flight', help: 'Model calls admitted and not finished', registers: [registry] }),
    modelCalls: new Counter({ name: 'chatwire_model_calls_total', help: 'Model calls started (one per provider stream)', registers: [registry] }),
    workerFailures: new Counter({
      name: 'chatwire_worker_failures_total',
      help: 'Model calls failed by a worker dying or passing its deadline',
      registers: [registry],
    }),
    tasks: new Counter({ name: 'chatwire_tasks_total', help: 'Chat tasks ended, by outcome', labelNames: ['outcome'], registers: [registry] }),
    errors: new Counter({ name: 'chatwire_errors_total', help: 'Errors sent to clients, by code', labelNames: ['code'], registers: [registry] }),
    pendingConnections: new Gauge({
      name: 'chatwire_pending_connections',
      help: 'Connections, socket.io sessions and requests not authenticated yet (bounded by CHATWIRE_MAX_PENDING_CONNECTIONS)',
      registers: [registry],
    }),
    rateLimitUsers: new Gauge({
      name: 'chatwire_rate_limit_users',
      help: 'Users the rate limiter keeps buckets for (idle users with full buckets are dropped)',
      registers: [registry],
    }),
    rateLimited: new Counter({
      name: 'chatwire_rate_limited_total',
      help: 'Requests refused by a rate-limit bucket',
      labelNames: ['bucket'],
      registers: [registry],
    }),
    slowClientsClosed: new Counter({
      name: 'chatwire_slow_clients_closed_total',
      help: 'Sockets closed for staying over the backpressure limit',
      registers: [registry],
    }),
    bufferedBytes: new Gauge({
      name: 'chatwire_buffered_bytes',
      help: 'Bytes held for readers that do not keep up, over all sockets (bounded by CHATWIRE_MAX_BUFFERED_BYTES)',
      registers: [registry],
    }),
    dbQueries: talliedCounter({ name: 'chatwire_db_queries_total', help: 'SQLite statements executed', labelName: 'op', registry }),
    dbCommitSeconds: new Histogram({
      name: 'chatwire_db_commit_seconds',
      help: 'Time of one group commit of chat writes',
      buckets: LATENCY_BUCKETS_S,
      registers: [registry],
    }),
    cacheHits: new Counter({ name: 'chatwire_cache_hits_total', help: 'Replies served from the response cache', registers: [registry] }),
    cacheMisses: new Counter({ name: 'chatwire_cache_misses_total', help: 'Cacheable requests not found in the response cache', registers: [registry] }),
    cacheBytes: new Gauge({ name: 'chatwire_cache_bytes', help: 'Bytes held by the response cache', registers: [registry] }),
    redisUp: new Gauge({
      name: 'chatwire_redis_up',
      help: 'Cluster mode: 1 while Redis answers, 0 while the node runs degraded on its own buckets, cache and single-flight',
      registers: [registry],
    }),
    redisFallbacks: new Counter({
      name: 'chatwire_redis_fallbacks_total',
      help: 'Cluster mode: operations answered by the node alone because Redis did not (by part)',
      labelNames: ['part'],
      registers: [registry],
    }),
    nodesLost: new Counter({
      name: 'chatwire_tasks_node_lost_total',
      help: 'Cluster mode: tasks this node ended node_lost because the node running them stopped renewing its lease',
      registers: [registry],
    }),
    retainedTaskBytes: new Gauge({
      name: 'chatwire_retained_task_bytes',
      help: 'Heap bytes held by finished tasks kept in memory for resume (bounded by CHATWIRE_TASK_RETENTION_MAX_BYTES)',
      registers: [registry],
    }),
    cacheEvictions: new Counter({ name: 'chatwire_cache_evictions_total', help: 'Cache entries evicted by the byte bound or TTL', registers: [registry] }),
    singleflightJoins: new Counter({
      name: 'chatwire_singleflight_joins_total',
      help: 'Chats that joined an identical model call in flight',
      registers: [registry],
    }),
    modelCallsSaved: new Counter({
      name: 'chatwire_model_calls_saved_total',
      help: 'Model calls not made: replies served from the response cache (cache) or shared with an identical call in flight (joined)',
      labelNames: ['reason'],
      registers: [registry],
    }),
    modelTokensSaved: new Counter({
      name: 'chatwire_model_tokens_saved_total',
      help: 'Prompt + completion tokens the saved model calls would have cost: the stored usage of the cached reply, or the usage of the call joined',
      labelNames: ['reason'],
      registers: [registry],
    }),
    eventLoopDelay: eventLoopDelayGauge(registry),
  };
  return m;
}

export type Metrics = ReturnType<typeof createMetrics>;

/** One count of a tallied counter (one label value): a plain field a hot path adds to. */
export class Tally {
  count = 0;
  inc(): void {
    this.count++;
  }
}

/**
 * A counter for hot paths (every frame, delta and statement): each label value
 * gets a Tally, a plain number the path adds to, and the sums reach the
 * prom-client counter when it is collected (every read of /metrics, and its
 * get()). prom-client's own inc() checks and hashes its labels on every call,
 * which cost about 2% of the main thread at 40,000 frames/s.
 */
function talliedCounter<L extends string = never>(config: { name: string; help: string; labelName?: L; registry: Registry }) {
  const tallies = new Map<string, Tally>();
  const { labelName } = config;
  const counter = new Counter<L>({
    name: config.name,
    help: config.help,
    labelNames: labelName === undefined ? [] : [labelName],
    registers: [config.registry],
    collect() {
      for (const [value, tally] of tallies) {
        if (tally.count === 0) continue;
        if (labelName === undefined) this.inc(tally.count);
        else this.inc({ [labelName]: value } as LabelValues<L>, tally.count);
        tally.count = 0;
      }
    },
  });
  return Object.assign(counter, {
    /** The tally of one label value (of the unlabelled counter when omitted); keep it, and inc() it. */
    tally(labelValue = ''): Tally {
      let tally = tallies.get(labelValue);
      if (tally === undefined) {
        tally = new Tally();
        tallies.set(labelValue, tally);
      }
      return tally;
    },
  });
}

/**
 * `chatwire_event_loop_delay_seconds{quantile="0.5"|"0.99"|"1"}`: how late the
 * event loop ran a timer, over the time since the previous scrape (each scrape
 * starts a new window). Unlike prom-client's `nodejs_eventloop_lag_*`, which
 * report the raw histogram, an idle loop reads 0 here, not the 10 ms period.
 */
function eventLoopDelayGauge(registry: Registry): Gauge<'quantile'> {
  const histogram = monitorEventLoopDelay({ resolution: EVENT_LOOP_RESOLUTION_MS });
  histogram.enable();
  const late = (ns: number) => Math.max(0, ns / 1e6 - EVENT_LOOP_RESOLUTION_MS) / 1000;
  return new Gauge({
    name: 'chatwire_event_loop_delay_seconds',
    help: 'How late the event loop ran a timer since the previous scrape: median, p99 and max (quantile 1)',
    labelNames: ['quantile'],
    registers: [registry],
    collect() {
      // No timer fired since the last scrape (scrapes closer together than the period): nothing new to say.
      if (histogram.count === 0) return;
      this.set({ quantile: '0.5' }, late(histogram.percentile(50)));
      this.set({ quantile: '0.99' }, late(histogram.percentile(99)));
      this.set({ quantile: '1' }, late(histogram.max));
      histogram.reset();
    },
  });
}
