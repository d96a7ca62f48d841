/**
 * The command line of the database scripts (migrate, seed, bench:db): options
 * parsed strictly with a usage line, and the data dir resolved the way the
 * server resolves it.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { ConfigError, loadConfig } from '../src/config.js';
import { lockDataDir, type DataDirLock } from '../src/db/data-dir-lock.js';
import { databaseFile } from '../src/db/data-file.js';

/** Writes `message` on stderr and exits with `code` (2: the command line or the settings are wrong). */
export function fail(message: string, code = 2): never {
  process.stderr.write(`${message}\n`);
  process.exit(code);
}

const HELP = { help: { type: 'boolean', short: 'h' } } as const;
type Values<O> = ReturnType<typeof parseArgs<{ options: O & typeof HELP; strict: true }>>['values'];

/** Parses argv against `options` plus `--help`/`-h`: an unknown or malformed option exits 2 with the usage line, --help prints it and exits 0. */
export function parseCommandLine<const O extends NonNullable<ParseArgsConfig['options']>>(usage: string, options: O): Values<O> {
  let values: Values<O>;
  try {
    ({ values } = parseArgs({ options: { ...options, ...HELP }, strict: true }));
  } catch (err) {
    fail(`${(err as Error).message}\n${usage}`);
  }
  if ((values as { help?: boolean }).help) {
    process.stdout.write(`${usage}\n`);
    process.exit(0);
  }
  return values;
}

/** The database file of `dataDir`, else of CHATWIRE_DATA_DIR (read through loadConfig, default ./data); a bad setting exits 2. */
export function databaseFileOf(dataDir: string | undefined): string {
  try {
    return databaseFile(loadConfig(process.env, dataDir === undefined ? {} : { dataDir }).dataPath);
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message);
    throw err;
  }
}

/** Takes the data dir's lock (src/db/data-dir-lock.ts), or stops with its message: exit 1. */
export function lockOrFail(dataPath: string): DataDirLock {
  try {
    return lockDataDir(dataPath);
  } catch (err) {
    fail((err as Error).message, 1);
  }
}

/**
 * The PostgreSQL database of the database scripts: `--database-url`, else
 * CHATWIRE_DATABASE_URL (cluster mode's setting); undefined means the SQLite
 * database of the data dir. Anything but a postgres:// URL exits 2.
 */
export function databaseUrlOf(flag: string | undefined): string | undefined {
  const url = flag ?? process.env.CHATWIRE_DATABASE_URL;
  if (url === undefined || url === '') return undefined;
  if (!/^postgres(ql)?:\/\//.test(url))
    fail(`${flag !== undefined ? '--database-url' : 'CHATWIRE_DATABASE_URL'} must be a postgres:// URL, got ${JSON.stringify(url)}`);
  return url;
}

/** The URL without its password, for output. */
export function redactUrl(url: string): string {
  const parsed = new URL(url);
  if (parsed.password) parsed.password = '***';
  return parsed.toString();
}
