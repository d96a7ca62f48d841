/**
 * chatwire as a user runs it: `node dist/src/main.js` in its own process, on
 * port 0 of 127.0.0.1, the port read from the start log line. For the tests
 * (and soak scripts) that kill, signal and restart the real process.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'main.js');

export interface ServerProcess {
  child: ChildProcess;
  port: number;
  http: string;
  ws: string;
  /** Everything the process wrote on stdout and stderr so far. */
  output(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGKILL: no shutdown code runs, as with a power cut of the process (the OS page cache survives). */
  kill(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGTERM and wait for the exit. */
  stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** `maxOpenFiles`: start it under that open-file limit (soft and hard, as `ulimit -n` sets both). */
export function startProcess(env: Record<string, string>, options: { maxOpenFiles?: number } = {}): Promise<ServerProcess> {
  const [file, args] =
    options.maxOpenFiles === undefined
      ? [process.execPath, [MAIN]]
      : ['sh', ['-c', `ulimit -n ${options.maxOpenFiles} && exec "$0" "$@"`, process.execPath, MAIN]];
  const child = spawn(file, args, {
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr?.on('data', (c: Buffer) => (out += c.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  return new Promise((resolve, reject) => {
    const onData = () => {
      const m = /"port":(\d+)/.exec(out);
      if (!m) return;
      child.stdout?.off('data', onData);
      const port = Number(m[1]);
      resolve({
        child,
        port,
        http: `http://127.0.0.1:${port}`,
        ws: `ws://127.0.0.1:${port}/ws`,
        output: () => out,
        exited,
        kill: () => {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
          return exited;
        },
        stop: () => {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
          return exited;
        },
      });
    };
    child.stdout?.on('data', onData);
    void exited.then(({ code, signal }) => reject(new Error(`chatwire exited (${code ?? signal}) before listening:\n${out.slice(-3000)}`)));
  });
}
