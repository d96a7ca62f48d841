/**
 * Run as a child process by store-recovery.ts (`node verify-store.js <dir>`):
 * opens the cache store and reads every record, so that a damaged file
 * crashes this process rather than the server. Exit 0: the store is readable.
 */
import { openLmdbStore } from './lmdb-store.js';

const dir = process.argv[2];
if (dir === undefined) {
  process.stderr.write('usage: verify-store <dir>\n');
  process.exit(2);
}
const store = openLmdbStore(dir);
let records = 0;
let bytes = 0;
// getRange copies each value out of the map, so every page is touched.
for (const db of [store.entries, store.meta]) {
  for (const { value } of db.getRange({})) {
    records += 1;
    bytes += value.length;
  }
}
await store.root.close();
process.stdout.write(`${records} records, ${bytes} bytes\n`);
