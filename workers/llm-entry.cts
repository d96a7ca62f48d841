/**
 * The file Piscina loads in each worker thread. Piscina require()s its worker file first, and on
 * Node 20 require() of an ES module can abort the whole process (a V8 fatal error, "IsGraphAsync
 * must be used on an instantiated module"); this CommonJS entry loads the real worker with import().
 */
type WorkerModule = typeof import('./llm.worker.js', { with: { 'resolution-mode': 'import' } });
type Task = Parameters<WorkerModule['default']>[0];

let worker: Promise<WorkerModule> | undefined;

module.exports = function entry(task: Task): Promise<string | null> {
  worker ??= import('./llm.worker.js');
  return worker.then((m) => m.default(task));
};
