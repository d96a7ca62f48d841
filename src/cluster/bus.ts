/**
 * The node bus: short messages between the nodes of a cluster (a task's live
 * notices, a cancel for the node running a task, a user's chat.started).
 *
 * One Redis subscription per node, never one per client: the bus subscribes to
 * a channel once, while it has at least one local listener, and fans each
 * message out to its listeners in this process. The embedded bus does the same
 * fan-out within the process, so the code above it is the same in both modes.
 *
 * Messages are notices, not the record: a subscriber that was cut off (Redis
 * restarted, the connection dropped) may have missed some, and is told so with
 * onResync, after which it reads what it needs from the record itself.
 */
import type { RedisHub } from './redis.js';

export type BusListener = (message: string) => void;

export interface NodeBus {
  /** Sends to every listener of `channel` on every node (this one included); false when it could not be sent. */
  publish(channel: string, message: string): Promise<boolean>;
  /** Listens on `channel` until the returned function is called. */
  subscribe(channel: string, listener: BusListener): () => void;
  /**
   * Resolves once every subscribe made so far is in effect: a reader that subscribes, awaits this, then reads the
   * record misses nothing sent after its read.
   */
  subscribed(): Promise<void>;
  /** Called after the bus reconnects: messages sent meanwhile were lost. */
  onResync(listener: () => void): () => void;
  close(): void;
}

/** Listeners per channel, and the calls to make when a channel gets its first or loses its last listener. */
class Channels {
  private readonly listeners = new Map<string, Set<BusListener>>();

  constructor(
    private readonly onFirst: (channel: string) => void,
    private readonly onLast: (channel: string) => void,
  ) {}

  add(channel: string, listener: BusListener): () => void {
    let set = this.listeners.get(channel);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(channel, set);
      this.onFirst(channel);
    }
    set.add(listener);
    return () => {
      const current = this.listeners.get(channel);
      if (current === undefined || !current.delete(listener) || current.size > 0) return;
      this.listeners.delete(channel);
      this.onLast(channel);
    };
  }

  deliver(channel: string, message: string): void {
    const set = this.listeners.get(channel);
    if (set === undefined) return;
    for (const listener of [...set]) {
      try {
        listener(message);
      } catch {
        // One listener's failure is its own: the others still hear the message.
      }
    }
  }

  names(): string[] {
    return [...this.listeners.keys()];
  }

  clear(): void {
    this.listeners.clear();
  }
}

/** The bus of one process: delivers in the same process, on a later microtask (as a message over Redis would arrive). */
export function createLocalBus(): NodeBus {
  const channels = new Channels(
    () => {},
    () => {},
  );
  return {
    publish(channel, message) {
      queueMicrotask(() => channels.deliver(channel, message));
      return Promise.resolve(true);
    },
    subscribe: (channel, listener) => channels.add(channel, listener),
    subscribed: () => Promise.resolve(),
    onResync: () => () => {},
    close: () => channels.clear(),
  };
}

/** The bus over Redis pub/sub: one SUBSCRIBE per channel in use, on the node's one subscriber connection. */
export function createRedisBus(hub: RedisHub): NodeBus {
  const { subscriber, command } = hub;
  const channels = new Channels(
    (channel) => {
      subscriber.subscribe(hub.key(channel)).catch(() => {
        // Not subscribed now: the connection resubscribes when it is back, and onResync tells listeners.
      });
    },
    (channel) => {
      subscriber.unsubscribe(hub.key(channel)).catch(() => {});
    },
  );
  const resync = new Set<() => void>();
  const prefixLength = hub.prefix.length;
  const onMessage = (channel: string, message: string) => channels.deliver(channel.slice(prefixLength), message);
  subscriber.on('message', onMessage);
  // The first ready is the start; every later one follows a cut, during which messages were lost.
  let readyBefore = subscriber.status === 'ready';
  const onReady = () => {
    if (readyBefore) for (const listener of [...resync]) listener();
    readyBefore = true;
  };
  subscriber.on('ready', onReady);
  return {
    async publish(channel, message) {
      try {
        await command.publish(hub.key(channel), message);
        return true;
      } catch {
        return false;
      }
    },
    subscribe: (channel, listener) => channels.add(channel, listener),
    async subscribed() {
      // Commands on one connection are answered in order: the PING's answer comes after the SUBSCRIBEs before it.
      await subscriber.ping();
    },
    onResync(listener) {
      resync.add(listener);
      return () => resync.delete(listener);
    },
    close() {
      subscriber.off('message', onMessage);
      subscriber.off('ready', onReady);
      resync.clear();
      const names = channels.names().map((c) => hub.key(c));
      channels.clear();
      if (names.length > 0) subscriber.unsubscribe(...names).catch(() => {});
    },
  };
}
