/**
 * What the server holds for readers that do not keep up, over every socket of every transport: each socket
 * reports the bytes it holds (uWS's send buffer, engine.io's packets waiting for a poll) after each write and
 * drain; past `maxBufferedBytes` in all, the most backed-up sockets are closed first until the sum is under it.
 * A socket's own limit (maxBackpressureBytes) is its transport's to enforce; this bounds their sum, which the
 * per-socket limit alone leaves growing with the number of sockets.
 */
export interface BufferedSocket {
  /** The bytes this socket holds now. */
  update(bytes: number): void;
  /** The socket closed: its bytes leave the sum. Idempotent. */
  release(): void;
}

export interface BufferBudget {
  /**
   * Starts counting a socket. `measure` reads what it holds now (the sum is re-measured before any socket is
   * closed: a socket may have drained without reporting it); `shed` closes it (1013) when the sum is over the bound.
   */
  open(measure: () => number, shed: () => void): BufferedSocket;
  /** The bytes held over all sockets, as last reported. */
  totalBytes(): number;
  /** Sockets closed to bring the sum under the bound. */
  shedCount(): number;
  close(): void;
}

interface Entry {
  bytes: number;
  open: boolean;
  measure: () => number;
  shed: () => void;
}

export function createBufferBudget(options: { maxBufferedBytes: number }): BufferBudget {
  const { maxBufferedBytes } = options;
  const entries = new Set<Entry>();
  let total = 0;
  let shedTotal = 0;
  let scheduled: NodeJS.Immediate | null = null;

  function set(entry: Entry, bytes: number): void {
    total += bytes - entry.bytes;
    entry.bytes = bytes;
  }

  function release(entry: Entry): void {
    if (!entry.open) return;
    entry.open = false;
    set(entry, 0);
    entries.delete(entry);
  }

  // Run after the turn that went over, not inside a transport's write: closing other sockets from inside one
  // socket's cork is not safe on uWS, and one turn's writes are bounded by the per-socket limit of each.
  function enforce(): void {
    scheduled = null;
    if (total <= maxBufferedBytes) return;
    for (const entry of entries) set(entry, entry.measure());
    if (total <= maxBufferedBytes) return;
    const fullest = [...entries].sort((a, b) => b.bytes - a.bytes);
    for (const entry of fullest) {
      if (total <= maxBufferedBytes) break;
      release(entry);
      shedTotal += 1;
      entry.shed();
    }
  }

  return {
    open(measure, shed) {
      const entry: Entry = { bytes: 0, open: true, measure, shed };
      entries.add(entry);
      return {
        update(bytes) {
          if (!entry.open) return;
          set(entry, bytes);
          if (total > maxBufferedBytes && scheduled === null) scheduled = setImmediate(enforce);
        },
        release: () => release(entry),
      };
    },
    totalBytes: () => total,
    shedCount: () => shedTotal,
    close() {
      if (scheduled !== null) clearImmediate(scheduled);
      scheduled = null;
      entries.clear();
      total = 0;
    },
  };
}
