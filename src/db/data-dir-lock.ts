import fs from 'node:fs';
import path from 'node:path';

/** The file in CHATWIRE_DATA_DIR that says which process serves from it: its pid, one line. */
export const LOCK_FILE_NAME = 'chatwire.pid';

export class DataDirInUseError extends Error {
  override name = 'DataDirInUseError';
}

export interface DataDirLock {
  /** Removes the lock file if it is still this process's. Idempotent. */
  release(): void;
}

/** True when a process with this pid exists (EPERM: it exists, as another user's). */
function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Takes the data dir for this process, before anything in it is opened: a second server started on the same dir
 * (SQLite and LMDB would both let it in) would otherwise mark the first one's running tasks failed as "left
 * unfinished" and remove its cache's open marker before it noticed anything. The lock is a file created
 * exclusively, holding the pid; a file whose process is gone (a crash, SIGKILL, a container restart where this
 * process has the same pid) is stale and taken over.
 */
export function lockDataDir(dataPath: string): DataDirLock {
  const file = path.join(dataPath, LOCK_FILE_NAME);
  const mine = `${process.pid}\n`;
  for (let attempt = 0; ; attempt++) {
    try {
      fs.writeFileSync(file, mine, { flag: 'wx' });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 2) throw err;
    }
    let holder: number;
    try {
      holder = Number(fs.readFileSync(file, 'utf8').trim());
    } catch (err) {
      // Removed between our create and our read: try again.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    if (Number.isSafeInteger(holder) && holder > 0 && holder !== process.pid && processExists(holder)) {
      throw new DataDirInUseError(
        `the data dir ${dataPath} is in use by another chatwire process (pid ${holder}, in ${file}); stop it first, or give this one its own CHATWIRE_DATA_DIR`,
      );
    }
    fs.rmSync(file, { force: true });
  }
  let held = true;
  return {
    release() {
      if (!held) return;
      held = false;
      try {
        if (fs.readFileSync(file, 'utf8') === mine) fs.rmSync(file, { force: true });
      } catch {
        // Already gone.
      }
    },
  };
}
