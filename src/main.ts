/** The chatwire program: createChatwire(optionsFromEnv()).listen(), plus signals and the shutdown deadline. */
import { pino } from 'pino';
import { createChatwire } from './chatwire.js';
import { ConfigError } from './config.js';
import { optionsFromEnv } from './options.js';

async function main(): Promise<void> {
  let options: ReturnType<typeof optionsFromEnv>;
  try {
    options = optionsFromEnv();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`chatwire: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const log = pino({ level: options.logLevel, base: { service: 'chatwire' } });
  const chatwire = createChatwire({ ...options, logger: log });
  const port = await chatwire.listen().catch((err: unknown) => {
    log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'chatwire could not start');
    process.exit(1);
  });
  const { host, llm, model, dataPath, workerThreads } = chatwire.config;
  log.info(
    { port, host, provider: llm, model, dataDir: dataPath, workers: workerThreads },
    `chatwire listening on http://${host === '0.0.0.0' ? 'localhost' : host}:${port}`,
  );

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    const deadline = setTimeout(() => {
      log.error({ timeoutMs: chatwire.config.shutdownTimeoutMs }, 'shutdown took too long; exiting anyway');
      process.exit(1);
    }, chatwire.config.shutdownTimeoutMs);
    deadline.unref();
    chatwire.close().then(
      () => {
        log.info('stopped');
        process.exit(0);
      },
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

void main();
