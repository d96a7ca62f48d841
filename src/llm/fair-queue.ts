/**
 * Items waiting for a worker, one first-in first-out line per owner (a user), served round-robin over the owners:
 * each turn takes the oldest item of the owner at the front of the ring and sends that owner to the back. An owner
 * with one item waiting is served after at most one item of each other owner, however many those have queued.
 * Every operation is O(1), except remove(), which is O(items of that owner).
 */
export class FairQueue<T> {
  /** Owner → its waiting items, oldest first. The Map's insertion order is the ring: the front owner is served next. */
  private readonly lines = new Map<string, T[]>();
  private total = 0;

  /** Items waiting, over all owners. */
  get size(): number {
    return this.total;
  }

  /** Owners with at least one item waiting. */
  get owners(): number {
    return this.lines.size;
  }

  /** Items of `owner` waiting. */
  count(owner: string): number {
    return this.lines.get(owner)?.length ?? 0;
  }

  /** Queues `item` behind the owner's earlier ones; an owner with nothing waiting joins the ring at the back. */
  push(owner: string, item: T): void {
    const line = this.lines.get(owner);
    if (line === undefined) this.lines.set(owner, [item]);
    else line.push(item);
    this.total++;
  }

  /** The next item: the oldest of the owner at the front of the ring, which then goes to the back (or leaves it). */
  shift(): T | undefined {
    const front = this.lines.entries().next();
    if (front.done === true) return undefined;
    const [owner, line] = front.value;
    const item = line.shift() as T;
    this.lines.delete(owner);
    if (line.length > 0) this.lines.set(owner, line);
    this.total--;
    return item;
  }

  /** Takes out an item that leaves before its turn (cancelled, past its deadline); false if it is not waiting. */
  remove(owner: string, item: T): boolean {
    const line = this.lines.get(owner);
    const i = line === undefined ? -1 : line.indexOf(item);
    if (line === undefined || i < 0) return false;
    line.splice(i, 1);
    // An owner whose line empties leaves the ring; it keeps its place if it still has items waiting.
    if (line.length === 0) this.lines.delete(owner);
    this.total--;
    return true;
  }

  /** Takes every item out, in turn order. */
  drain(): T[] {
    const out: T[] = [];
    for (let item = this.shift(); item !== undefined; item = this.shift()) out.push(item);
    return out;
  }
}
