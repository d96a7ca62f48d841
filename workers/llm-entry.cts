/**
 * The file Piscina loads in each worker thread. Piscina require()s its worker file first, and on
 * Node 20 require() of an ES module can abort the whole process (a V8 fatal error, "IsGraphAsync
 * must be used on an instantiated module"); this CommonJS entry loads the real worker with import().
 */
type WorkerModule = typeof import('./llm.worker.js', { with: { 'resolution-mode': 'import' }});
type Task = Parameters<WorkerModule['default']>[0];

// Loaded as the thread starts (Piscina loads this file then), not at its first task: the worker warms its provider
// as it loads (see llm.worker.ts), before the server says it is ready.
const worker: Promise<WorkerModule> = import('./llm.worker.js');

module.exports = function entry(task: Task): Promise<string | null> {
  return worker.then((m) => m.default(task));
};
