import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { createApp, type App } from '../../src/app.js';
import { loadConfig, type Config, type settings } from '../../src/config.js';
import { attachToNodeServer } from '../../src/transport/node-http.js';

type Overrides = Parameters<typeof loadConfig>[1];

export interface TestServer {
  app: App;
  config: Config;
  port: number;
  http: string;
  ws: string;
  dataDir: string;
  close(): Promise<void>;
  /** Closes the server but keeps the data dir (to restart on it). */
  stop(): Promise<void>;
}

export function tempDataDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-test-'));
}

/** Starts a real chatwire server on 127.0.0.1, port 0, with a temp data dir and the dev provider. */
export async function startServer(overrides: Overrides = {}, dataDir = tempDataDir()): Promise<TestServer> {
  const config = loadConfig({}, {
    port: 0,
    host: '127.0.0.1',
    dataDir,
    devTokenDelayMs: 0,
    workerThreads: 1,
    logLevel: 'silent',
    ...overrides,
  } as Overrides);
  const log = pino({ level: config.logLevel });
  // CHATWIRE_TEST_SERVER=node runs the same tests against chatwire attached to a node:http server.
  const host = process.env.CHATWIRE_TEST_SERVER === 'node' ? await nodeHost(config.host) : null;
  const app = await createApp(config, host === null ? { log } : { log, serve: async (deps) => attachToNodeServer(host, deps, '') });
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await app.close();
    if (host !== null) await new Promise((resolve) => host.close(resolve));
  };
  return {
    app,
    config,
    port: app.port,
    http: `http://127.0.0.1:${app.port}`,
    ws: `ws://127.0.0.1:${app.port}/ws`,
    dataDir,
    stop,
    async close() {
      await stop();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A plain node:http server listening on a free port, answering 404 to what is not chatwire's. */
async function nodeHost(address: string): Promise<http.Server> {
  const host = http.createServer((_req, res) => {
    res.statusCode = 404;
    res.end();
  });
  await new Promise<void>((resolve) => host.listen(0, address, resolve));
  return host;
}

export type SettingName = keyof typeof settings;

/** One counter or gauge without labels, read from the server's /metrics; throws when the server does not export it. */
export async function metric(server: TestServer, name: string): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  if (!m) throw new Error(`no metric ${name} in /metrics`);
  return Number(m[1]);
}
