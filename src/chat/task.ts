import type { ChatDone, ChatError, ServerMessage, TaskInfo, TaskStatus } from '../protocol/index.js';

/**
 * Where a task's messages go: one connection (or SSE response). `deliver`
 * returns false when the peer is gone. `congested` is true while the peer's
 * send buffer is over its soft limit: deltas then wait in the task (which
 * keeps them anyway, for resume) instead of piling up in the socket.
 */
export interface Sink {
  deliver(message: ServerMessage): boolean;
  congested(): boolean;
  /** Runs `fn` with the peer's writes batched into one syscall where the transport can. */
  cork?(fn: () => void): void;
}

export type TaskTerminal = ChatDone | ChatError;

/**
 * Where a task's sealed deltas go besides its subscribers: cluster mode's task log, which readers on other nodes
 * follow. Deltas are handed over once each, in seq order, once sealed (they never change after); then the terminal.
 */
export interface TaskPublisher {
  markRunning(): void;
  append(seq: number, text: string): void;
  end(terminal: TaskTerminal): void;
}

/** One peer's view of a task: a cursor into the task's deltas. Memory per subscriber is O(1). */
export class Subscription {
  private cursor: number;
  private finished = false;
  private pumped = false;

  constructor(
    readonly task: Task,
    readonly sink: Sink,
    fromSeq: number,
    private readonly onDelta?: () => void,
  ) {
    this.cursor = fromSeq;
  }

  get closed(): boolean {
    return this.finished;
  }

  /**
   * True once its owner has pumped it. Until then the task sends it nothing, not its new text and not its end:
   * the owner may still be replying (chat.resume's ok goes out before the replay, whenever the task ends).
   */
  get started(): boolean {
    return this.pumped;
  }

  /** Sends what the peer has not seen yet, as far as its buffer allows; then the terminal message. */
  pump(): void {
    this.pumped = true;
    if (this.finished) return;
    if (this.sink.cork) this.sink.cork(() => this.pumpNow());
    else this.pumpNow();
  }

  /** pump() without corking: the caller has corked the sink already. */
  pumpNow(): void {
    if (this.finished) return;
    const task = this.task;
    const taskId = task.taskId;
    while (this.cursor < task.deltaCount) {
      if (this.sink.congested()) return;
      const seq = this.cursor;
      task.seal(seq);
      if (!this.sink.deliver({ type: 'chat.delta', taskId, seq, text: task.deltaAt(seq) })) {
        this.close();
        return;
      }
      this.cursor++;
      this.onDelta?.();
    }
    const terminal = this.task.terminal;
    if (terminal !== null) {
      if (this.sink.congested()) return;
      this.sink.deliver(terminal);
      this.close();
    }
  }

  close(): void {
    if (this.finished) return;
    this.finished = true;
    this.task.subscribers.delete(this);
  }
}

// A delta that nobody has seen yet grows up to this size before a new one starts.
const MAX_COALESCED_CHARS = 4096;
// Appending a chunk to a string makes a rope node (about 32 bytes) that keeps the chunk's own string alive: per
// model token some 90 bytes of heap for 6 characters of text, the most of what a running task (and so a reader
// that stopped reading it) costs. The text and the open delta are flattened after this many appends.
const FLATTEN_EVERY = 64;

/**
 * Live deltas are sent once per turn of the event loop, not one write per
 * model chunk: the chunks of every task that arrive in one poll phase (the
 * worker ports deliver many at once under load) go out in the check phase
 * right after it, every subscription of one peer inside one cork, so a peer
 * gets one write (one syscall) per turn however many frames it carries. Each
 * chunk a ready peer will be sent is still its own frame (see pushDelta); the
 * delay is at most one loop turn. One per chat service, shared by its tasks.
 */
export class PumpScheduler {
  private readonly dirty = new Set<Task>();
  private scheduled = false;

  /** Pumps the task's subscribers at the end of this turn, with every other task that got text in it. */
  pumpLater(task: Task): void {
    this.dirty.add(task);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }

  private flush(): void {
    this.scheduled = false;
    const bySink = new Map<Sink, Subscription[]>();
    for (const task of this.dirty) {
      for (const sub of task.subscribers) {
        if (!sub.started) continue;
        const subs = bySink.get(sub.sink);
        if (subs) subs.push(sub);
        else bySink.set(sub.sink, [sub]);
      }
    }
    for (const task of this.dirty) task.publish();
    this.dirty.clear();
    for (const [sink, subs] of bySink) {
      const pumpAll = () => {
        for (const sub of subs) sub.pumpNow();
      };
      if (sink.cork) sink.cork(pumpAll);
      else pumpAll();
    }
  }
}

/**
 * One chat.send: its own id, its own contiguous seq, its subscribers, and the
 * one terminal message (chat.done or chat.error) it ends with.
 *
 * Coalescing: a delta is sealed (immutable) once any peer has been sent it,
 * or is due to be sent it at the end of this turn. Until then new text is
 * appended to it, so while every subscriber is backed up (or none is
 * connected) the tokens pile into one delta instead of one frame each, and seq
 * stays the same for everyone: no gap, nothing rewritten that a client has seen.
 */
export class Task {
  /** The deltas while the task runs; null once it has ended and they were compacted into `ends`. */
  private live: string[] | null = [];
  /** After the end: where each delta ends in `text`. */
  private ends: Uint32Array | null = null;
  private sealed = 0;
  private appendsSinceFlat = 0;
  readonly subscribers = new Set<Subscription>();
  private _status: TaskStatus = 'queued';
  private _terminal: TaskTerminal | null = null;
  private _text = '';
  private _firstTokenAt: number | null = null;
  private _startedAt: number | null = null;
  private _endedAt: number | null = null;
  private _ending = false;
  private publisher: TaskPublisher | null = null;
  /** Deltas handed to the publisher so far. */
  private published = 0;

  /** `pumps`: the owner's scheduler of live deltas; null for an ended task rebuilt from storage, which takes no text. */
  constructor(
    readonly taskId: string,
    readonly userId: string,
    readonly conversationId: string,
    readonly receivedAt: number,
    readonly createdAt: number,
    readonly cached: boolean,
    private readonly pumps: PumpScheduler | null,
  ) {}

  get status(): TaskStatus {
    return this._status;
  }
  /** The chat.done or chat.error it ended with; null while it runs. */
  get terminal(): TaskTerminal | null {
    return this._terminal;
  }
  get text(): string {
    return this._text;
  }
  /** performance.now() of the first model text, of the model call's start, and Date.now() of the end. */
  get firstTokenAt(): number | null {
    return this._firstTokenAt;
  }
  get startedAt(): number | null {
    return this._startedAt;
  }
  get endedAt(): number | null {
    return this._endedAt;
  }
  /** True once the task is ending (cancel, model end, error): it takes no more text and ends only once. */
  get ending(): boolean {
    return this._ending;
  }

  /** Records when its model call started (the first report wins). */
  noteStarted(at: number): void {
    this._startedAt ??= at;
  }

  /** A worker has started the model call: `task.get` says running from now on, before the first token. */
  markRunning(): void {
    if (this._status !== 'queued' || this._ending) return;
    this._status = 'running';
    this.publisher?.markRunning();
  }

  /** Hands every sealed delta, from now on, to `publisher` too (at the end of each loop turn, as subscribers get them). */
  publishTo(publisher: TaskPublisher): void {
    this.publisher = publisher;
    if (this._status === 'running') publisher.markRunning();
    if (this.deltaCount > 0) this.pumps?.pumpLater(this);
  }

  /** Seals the deltas the publisher has not had and hands them over (PumpScheduler calls it once per loop turn). */
  publish(): void {
    const publisher = this.publisher;
    const deltas = this.live;
    if (publisher === null || deltas === null || this.published >= deltas.length) return;
    this.sealed = deltas.length;
    for (; this.published < deltas.length; this.published++) publisher.append(this.published, deltas[this.published] as string);
  }

  /** Starts ending it: false when it is ending already (the caller must not end it twice). */
  beginEnding(): boolean {
    if (this._ending) return false;
    this._ending = true;
    return true;
  }

  /** Adds model text; `coalesce` false keeps it a delta of its own (a replay keeps its chunk boundaries). */
  pushDelta(text: string, coalesce = true): void {
    if (this._ending || text.length === 0) return;
    if (this._firstTokenAt === null) this._firstTokenAt = performance.now();
    if (this._status === 'queued') this.markRunning();
    const deltas = this.live;
    if (deltas === null) return;
    const last = deltas.length - 1;
    if (coalesce && last >= this.sealed && (deltas[last] as string).length + text.length <= MAX_COALESCED_CHARS) {
      deltas[last] += text;
    } else {
      deltas.push(text);
      if (!coalesce) this.sealed = deltas.length;
    }
    this._text += text;
    if (++this.appendsSinceFlat >= FLATTEN_EVERY) {
      this.appendsSinceFlat = 0;
      // Converting a string to a number flattens it in place (see compact()).
      void Number(this._text);
      void Number(deltas[deltas.length - 1]);
    }
    if (this.subscribers.size === 0) {
      if (this.publisher !== null) this.pumps?.pumpLater(this);
      return;
    }
    // A peer that is not backed up gets this chunk as a frame of its own at the end of the turn.
    for (const sub of this.subscribers) {
      if (!sub.sink.congested()) {
        this.sealed = deltas.length;
        break;
      }
    }
    this.pumps?.pumpLater(this);
  }

  /** Ends the task: every subscriber is sent what it has not seen, then the terminal message, now. */
  end(terminal: TaskTerminal, status: Extract<TaskStatus, 'done' | 'error' | 'cancelled'>): void {
    if (this._terminal !== null) return;
    // The log gets every delta, then the terminal, before the subscribers are sent it.
    this.publish();
    this.publisher?.end(terminal);
    this.publisher = null;
    this._terminal = terminal;
    this._status = status;
    this._endedAt = Date.now();
    for (const sub of this.subscribers) if (sub.started) sub.pump();
    this.compact();
  }

  get deltaCount(): number {
    return this.live !== null ? this.live.length : (this.ends as Uint32Array).length;
  }

  /** Where each delta ends in `text` (UTF-16 code units); the live deltas once the task is ending, so what was sent. */
  deltaEnds(): Uint32Array {
    if (this.ends !== null) return this.ends;
    const deltas = this.live as string[];
    const ends = new Uint32Array(deltas.length);
    let at = 0;
    for (let i = 0; i < deltas.length; i++) ends[i] = at += (deltas[i] as string).length;
    return ends;
  }

  /**
   * An ended task rebuilt from storage (see chat/retention.ts): the same text, chunk boundaries and terminal
   * message as when it streamed live, so a resume replays the same frames.
   */
  static restored(
    ids: { taskId: string; userId: string; conversationId: string; createdAt: number; endedAt: number; cached: boolean },
    text: string,
    ends: Uint32Array,
    terminal: TaskTerminal,
    status: Extract<TaskStatus, 'done' | 'error' | 'cancelled'>,
  ): Task {
    const task = new Task(ids.taskId, ids.userId, ids.conversationId, 0, ids.createdAt, ids.cached, null);
    task._ending = true;
    task._text = text;
    task.live = null;
    task.ends = ends;
    task.sealed = ends.length;
    task._terminal = terminal;
    task._status = status;
    task._endedAt = ids.endedAt;
    return task;
  }

  deltaAt(seq: number): string {
    if (this.live !== null) return this.live[seq] as string;
    const ends = this.ends as Uint32Array;
    return this._text.slice(seq === 0 ? 0 : ends[seq - 1], ends[seq]);
  }

  /**
   * An ended task is kept for the retention window (resume, task.get) with
   * its text as one flat string and the delta boundaries as offsets into it,
   * not one string per delta: about a third of the memory per retained task.
   */
  private compact(): void {
    if (this.live === null) return;
    const ends = this.deltaEnds();
    // Converting a string to a number flattens it in place: the text stops being a rope of every appended chunk.
    void Number(this._text);
    this.ends = ends;
    this.live = null;
    this.sealed = ends.length;
  }

  /** Adds a subscriber; nothing is sent until its first pump() (see Subscription.started), so the caller can reply first. */
  subscribe(sink: Sink, fromSeq: number, onDelta?: () => void): Subscription {
    const sub = new Subscription(this, sink, fromSeq, onDelta);
    this.subscribers.add(sub);
    return sub;
  }

  /** Marks deltas up to `seq` as seen by someone: they never change again. */
  seal(seq: number): void {
    if (seq >= this.sealed) this.sealed = seq + 1;
  }

  /** A snapshot for task.get; what it reports is sealed, so resuming from its seq misses nothing. */
  info(): TaskInfo {
    this.sealed = this.deltaCount;
    return {
      taskId: this.taskId,
      conversationId: this.conversationId,
      status: this.status,
      seq: this.deltaCount,
      text: this.text,
      createdAt: new Date(this.createdAt).toISOString(),
    };
  }
}
