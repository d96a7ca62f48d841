import path from 'node:path';

/** The SQLite file inside CHATWIRE_DATA_DIR (the LMDB cache lives beside it). */
export const DATABASE_FILE_NAME = 'chatwire.sqlite';

export function databaseFile(dataPath: string): string {
  return path.join(dataPath, DATABASE_FILE_NAME);
}
