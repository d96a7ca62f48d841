/**
 * A chatwire cluster for a test: N real processes in cluster mode (see
 * cluster-nodes.ts) on a fresh PostgreSQL database of this test run and a
 * Redis key prefix of this run, each node with its own data dir. stop() ends
 * the nodes, then drops the database and deletes the keys; whatever a test
 * leaves, the helpers' own hooks clean up when the file ends.
 *
 * The tests skip unless PostgreSQL and Redis answer, except under CI (then
 * they run, and fail saying which one is missing).
 */
import { Cluster, deleteRedisKeys, type ClusterNode } from './cluster-nodes.js';
import { createTestDatabase, databaseUrl, dropTestDatabase, pgTestOptions } from './postgres.js';
import { redisTestOptions, TEST_REDIS_URL, testRedisPrefix } from './redis.js';

export { Cluster, RedisServer, TcpProxy, type ClusterNode } from './cluster-nodes.js';

/** `{ skip }` with the reason when PostgreSQL or Redis does not answer, unless CI is set. */
export async function clusterTestOptions(): Promise<{ skip?: string }> {
  const [pg, redis] = await Promise.all([pgTestOptions(), redisTestOptions()]);
  if (pg.skip !== undefined) return pg;
  return redis;
}

export interface TestClusterOptions {
  /** Default 3. */
  nodes?: number;
  /** Settings of every node. */
  env?: Record<string, string>;
  /** The nodes' Redis; default the test server (CHATWIRE_TEST_REDIS_URL). */
  redisUrl?: string;
  /** The nodes reach PostgreSQL through this port of 127.0.0.1 (a TcpProxy's) instead of the server's own. */
  databasePort?: number;
}

export interface TestCluster extends Cluster {
  /** The database as the test reaches it (never through a proxy). */
  readonly directDatabaseUrl: string;
}

/** Starts the nodes on a new database of this test run and a new key prefix. */
export async function startCluster(options: TestClusterOptions = {}): Promise<TestCluster> {
  const name = await createTestDatabase();
  const direct = databaseUrl(name);
  const nodesUrl = new URL(direct);
  if (options.databasePort !== undefined) {
    nodesUrl.hostname = '127.0.0.1';
    nodesUrl.port = String(options.databasePort);
  }
  const redisUrl = options.redisUrl ?? TEST_REDIS_URL;
  const redisPrefix = testRedisPrefix();
  let cluster: Cluster;
  try {
    cluster = await Cluster.start({
      nodes: options.nodes ?? 3,
      databaseUrl: nodesUrl.toString(),
      redisUrl,
      redisPrefix,
      env: options.env ?? {},
    });
  } catch (err) {
    await dropTestDatabase(name);
    await deleteRedisKeys(redisUrl, redisPrefix);
    throw err;
  }
  const stopNodes = cluster.stop.bind(cluster);
  return Object.assign(cluster, {
    directDatabaseUrl: direct,
    stop: async (graceMs?: number) => {
      await stopNodes(graceMs);
      await dropTestDatabase(name);
      await deleteRedisKeys(redisUrl, redisPrefix);
    },
  });
}

/** Every node's log so far, for an assertion message. */
export function clusterLogs(nodes: readonly ClusterNode[], lastChars = 1500): string {
  return nodes.map((n) => `--- node ${n.name} ---\n${n.process.output().slice(-lastChars)}`).join('\n');
}
