/**
 * The chat page served at GET / (markup and styles in public/index.html),
 * built only on the client library: the browser loads this compiled module
 * and ./client.js as they are, without a bundler.
 *
 * Error boundary: every handler runs inside `guard`, and window `error` /
 * `unhandledrejection` land in the same banner, so a failure in rendering or a
 * frame the page cannot use shows a message and leaves the page working.
 *
 * The protocol has no "list my conversations" message, so the sidebar keeps
 * the conversations this browser has used in localStorage (per user id) and
 * loads each one's messages from the server with conversation.history.
 */
import { ChatwireError, connect, type ChatResult, type ChatStream, type ChatwireClient, type ClientEvents } from './client.js';
import type { HistoryMessage } from '../protocol/index.js';

interface ConversationEntry {
  id: string;
  title: string;
  updatedAt: number;
}

/** One conversation's thread; threads stay in memory, so a reply keeps streaming into its own while another is shown. */
interface Thread {
  conversationId: string | null;
  root: HTMLElement;
  loaded: boolean;
  oldestMessageId: string | null;
}

function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el as T;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string, text?: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const ui = {
  list: byId<HTMLUListElement>('conversations'),
  newChat: byId<HTMLButtonElement>('new-chat'),
  who: byId('who'),
  title: byId('title'),
  connection: byId('connection'),
  reconnectNow: byId<HTMLButtonElement>('reconnect-now'),
  banner: byId('banner'),
  bannerText: byId('banner-text'),
  bannerClose: byId<HTMLButtonElement>('banner-close'),
  notice: byId('notice'),
  messages: byId('messages'),
  form: byId<HTMLFormElement>('composer'),
  input: byId<HTMLTextAreaElement>('input'),
  skipCache: byId<HTMLInputElement>('skip-cache'),
  maxTokens: byId<HTMLInputElement>('max-tokens'),
  send: byId<HTMLButtonElement>('send'),
  stop: byId<HTMLButtonElement>('stop'),
  rateLimit: byId('ratelimit'),
  rateLimitText: byId('ratelimit-text'),
  rateLimitCancel: byId<HTMLButtonElement>('ratelimit-cancel'),
};

// ---------- the error boundary ----------

function showError(context: string, err: unknown): void {
  const message = err instanceof Error ? err.message : String(err);
  console.error(`chatwire page: ${context}`, err);
  ui.bannerText.textContent = `${context}: ${message}. The chat is still usable.`;
  ui.banner.hidden = false;
}

/** Runs `fn`; a throw becomes a banner message instead of a broken page. */
function guard<A extends unknown[]>(context: string, fn: (...args: A) => void | Promise<void>): (...args: A) => void {
  return (...args) => {
    try {
      const out = fn(...args);
      if (out instanceof Promise) out.catch((err: unknown) => showError(context, err));
    } catch (err) {
      showError(context, err);
    }
  };
}

window.addEventListener('error', (event) => showError('Something went wrong', event.error ?? event.message));
window.addEventListener('unhandledrejection', (event) => showError('Something went wrong', event.reason));
ui.bannerClose.addEventListener('click', () => {
  ui.banner.hidden = true;
});

// ---------- identity and storage ----------

/** localStorage can be missing or throw (private mode, quota): the page works without it. */
const storage = {
  get(key: string): string | null {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key: string, value: string): void {
    try {
      localStorage.setItem(key, value);
    } catch {
      // Not persisted; the session still works.
    }
  },
};

const query = new URLSearchParams(location.search);
const token = query.get('token') ?? undefined;
function guestId(): string {
  let id = storage.get('chatwire.user');
  if (!id) {
    id = `guest-${Math.random().toString(36).slice(2, 8)}`;
    storage.set('chatwire.user', id);
  }
  return id;
}
const user = token === undefined ? (query.get('user') ?? guestId()) : undefined;

let conversations: ConversationEntry[] = [];
let listKey: string | null = null;

function loadConversations(userId: string): void {
  listKey = `chatwire.conversations.${userId}`;
  try {
    const parsed: unknown = JSON.parse(storage.get(listKey) ?? '[]');
    conversations = Array.isArray(parsed)
      ? parsed.filter((c): c is ConversationEntry => typeof c?.id === 'string' && typeof c?.title === 'string' && typeof c?.updatedAt === 'number')
      : [];
  } catch {
    conversations = [];
  }
}

function saveConversations(): void {
  if (listKey) storage.set(listKey, JSON.stringify(conversations.slice(0, 100)));
}

function touchConversation(id: string, title: string): void {
  const existing = conversations.find((c) => c.id === id);
  conversations = [{ id, title: existing?.title ?? title, updatedAt: Date.now() }, ...conversations.filter((c) => c.id !== id)];
  saveConversations();
  renderList();
}

// ---------- rendering ----------

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

function when(ms: number): string {
  const d = new Date(ms);
  return new Date().toDateString() === d.toDateString() ? timeFormat.format(d) : dayFormat.format(d);
}

let current: Thread = newThread(null);
const threads = new Map<string, Thread>();
let busy = false;

function newThread(conversationId: string | null): Thread {
  const root = el('div', 'thread');
  if (conversationId === null) {
    const hint = el('div', 'hint');
    hint.append(
      el('strong', undefined, 'What can I help with?'),
      'Replies stream in as the model writes them. Try asking the same thing twice: the second answer comes from the cache.',
    );
    root.append(hint);
  }
  return { conversationId, root, loaded: conversationId === null, oldestMessageId: null };
}

function renderList(): void {
  const items = conversations.map((c) => {
    const li = el('li');
    const button = el('button');
    button.type = 'button';
    button.dataset.conversationId = c.id;
    button.setAttribute('aria-current', String(c.id === current.conversationId));
    button.append(el('span', 'title', c.title), el('span', 'when', when(c.updatedAt)));
    button.addEventListener(
      'click',
      guard('Opening the conversation failed', () => showThread(c.id)),
    );
    li.append(button);
    return li;
  });
  if (items.length === 0) items.push(el('li', 'empty', 'Your conversations appear here.'));
  ui.list.replaceChildren(...items);
}

function setTitle(): void {
  const entry = conversations.find((c) => c.id === current.conversationId);
  ui.title.textContent = entry?.title ?? 'New chat';
}

function scrollToEnd(force = false): void {
  const box = ui.messages;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

function userMessage(thread: Thread, text: string): HTMLElement {
  thread.root.querySelector('.hint')?.remove();
  const node = el('article', 'msg user');
  node.append(el('div', 'bubble', text));
  thread.root.append(node);
  return node;
}

interface ReplyView {
  node: HTMLElement;
  text: HTMLElement;
  meta: HTMLElement;
}

function assistantMessage(thread: Thread): ReplyView {
  const node = el('article', 'msg assistant');
  const bubble = el('div', 'bubble');
  const text = el('span', 'text');
  bubble.append(text);
  const meta = el('div', 'meta');
  node.append(bubble, meta);
  thread.root.append(node);
  return { node, text, meta };
}

function historyMessage(m: HistoryMessage): HTMLElement {
  const node = el('article', `msg ${m.role}`);
  node.dataset.messageId = m.messageId;
  const bubble = el('div', 'bubble');
  bubble.append(m.role === 'assistant' ? el('span', 'text', m.text) : m.text);
  node.append(bubble, el('div', 'meta', timeFormat.format(new Date(m.createdAt))));
  return node;
}

async function loadHistory(thread: Thread): Promise<void> {
  if (thread.conversationId === null) return;
  const page = await client.history(thread.conversationId, thread.oldestMessageId === null ? { limit: 30 } : { limit: 30, before: thread.oldestMessageId });
  thread.root.querySelector('.older')?.remove();
  const nodes: HTMLElement[] = page.messages.map(historyMessage);
  if (page.hasMore) {
    const older = el('button', 'secondary older', 'Load earlier messages');
    older.type = 'button';
    older.addEventListener(
      'click',
      guard('Loading earlier messages failed', () => loadHistory(thread)),
    );
    nodes.unshift(older);
  }
  thread.root.prepend(...nodes);
  thread.oldestMessageId = page.messages[0]?.messageId ?? thread.oldestMessageId;
  thread.loaded = true;
}

async function showThread(conversationId: string | null): Promise<void> {
  let thread = conversationId === null ? newThread(null) : threads.get(conversationId);
  if (!thread) {
    thread = newThread(conversationId);
    threads.set(conversationId as string, thread);
  }
  current = thread;
  // Chats of this user started elsewhere (another tab or device) in the conversation shown stream here too.
  client.chat.follow(thread.conversationId);
  ui.messages.replaceChildren(thread.root);
  setTitle();
  renderList();
  if (!thread.loaded) {
    try {
      await loadHistory(thread);
    } catch (err) {
      if (err instanceof ChatwireError && (err.code === 'not_found' || err.code === 'forbidden')) {
        // The server no longer has it (a fresh data dir) or it is not this user's: drop it from the list.
        conversations = conversations.filter((c) => c.id !== conversationId);
        saveConversations();
        threads.delete(conversationId as string);
        notice('That conversation is no longer on the server.');
        await showThread(null);
        return;
      }
      throw err;
    }
  }
  scrollToEnd(true);
  ui.input.focus();
}

let noticeTimer: ReturnType<typeof setTimeout> | undefined;
function notice(text: string): void {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    ui.notice.hidden = true;
  }, 5000);
}

function setBusy(value: boolean): void {
  busy = value;
  ui.send.disabled = value;
  ui.stop.hidden = !value;
}

// ---------- the connection ----------

const client: ChatwireClient = connect(location.origin, token === undefined ? { user } : { token });

const stateText: Record<ClientEvents['state']['state'], string> = {
  connecting: 'connecting…',
  open: 'connected',
  reconnecting: 'reconnecting…',
  closed: 'disconnected',
};

client.on(
  'state',
  guard('Showing the connection state failed', (s: ClientEvents['state']) => {
    document.body.dataset.connection = s.state;
    ui.connection.dataset.state = s.state;
    let text = stateText[s.state];
    if ((s.state === 'reconnecting' || s.state === 'connecting') && s.delayMs !== undefined) {
      text = `${s.state} in ${(s.delayMs / 1000).toFixed(1)} s${s.attempt > 1 ? ` (attempt ${s.attempt})` : ''}…`;
    }
    ui.connection.textContent = text;
    ui.reconnectNow.hidden = s.delayMs === undefined || s.state === 'open';
  }),
);

let helloSeen = false;
client.on(
  'hello',
  guard('Showing the connection failed', (hello: ClientEvents['hello']) => {
    ui.who.textContent = `signed in as ${hello.userId} · ${hello.provider}/${hello.model} · ${hello.limits.chatsPerMinute} chats/min`;
    if (!helloSeen) {
      helloSeen = true;
      loadConversations(hello.userId);
      renderList();
    }
  }),
);

client.on('resumed', (streams: ChatStream[]) =>
  notice(`Reconnected: resumed ${streams.length === 1 ? 'the reply' : `${streams.length} replies`} where it left off.`),
);

client.on(
  'started',
  guard('Showing a chat sent from elsewhere failed', ({ message, stream }: ClientEvents['started']) => {
    touchConversation(message.conversationId, message.text.length > 60 ? `${message.text.slice(0, 57)}…` : message.text);
    const thread = threads.get(message.conversationId);
    if (stream === null || thread === undefined || current !== thread) return;
    const theirs = userMessage(thread, message.text);
    theirs.dataset.state = 'sent';
    theirs.dataset.messageId = message.messageId;
    theirs.dataset.from = 'elsewhere';
    return streamReply(thread, stream, performance.now());
  }),
);

client.on('error', (err: ChatwireError) => {
  if (err.code === 'bad_frame') showError('The server sent a frame this page could not read, so it was skipped', err);
  else showError('The server reported an error', err);
});

ui.reconnectNow.addEventListener('click', () => client.reconnectNow());
window.addEventListener('online', () => client.reconnectNow());

// ---------- sending ----------

let activeStream: ChatStream | null = null;
let pendingAbort: AbortController | null = null;
let countdown: ReturnType<typeof setInterval> | undefined;

function showCountdown(retryAt: number): void {
  const tick = () => {
    const seconds = String(Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)));
    if (ui.rateLimitText.dataset.seconds === seconds && !ui.rateLimit.hidden) return;
    ui.rateLimitText.dataset.seconds = seconds;
    ui.rateLimitText.textContent = `Rate limit reached: sending in ${seconds} s`;
  };
  tick();
  ui.rateLimit.hidden = false;
  clearInterval(countdown);
  countdown = setInterval(tick, 250);
}

function hideCountdown(): void {
  clearInterval(countdown);
  ui.rateLimit.hidden = true;
}

function readMaxTokens(): number | undefined {
  const n = ui.maxTokens.valueAsNumber;
  return Number.isInteger(n) && n >= 1 && n <= 4096 ? n : undefined;
}

function describeFinish(result: ChatResult, view: ReplyView, ttftMs: number | null): void {
  const parts: HTMLElement[] = [];
  if (result.cached) parts.push(el('span', 'badge cached', '⚡ cached'));
  const ttft = el('span', 'ttft', ttftMs === null ? 'no tokens' : `first token ${Math.round(ttftMs)} ms`);
  ttft.title = `measured in this page; server: queue ${Math.round(result.timings.queueMs)} ms, first token ${result.timings.firstTokenMs === null ? '–' : Math.round(result.timings.firstTokenMs)} ms, total ${Math.round(result.timings.totalMs)} ms`;
  parts.push(ttft, el('span', undefined, `${result.usage.completionTokens} tokens`));
  if (result.finishReason === 'cancelled') parts.push(el('span', 'badge stopped', 'stopped'));
  if (result.finishReason === 'length') parts.push(el('span', undefined, 'max tokens reached'));
  view.meta.replaceChildren(...parts);
  view.node.dataset.messageId = result.messageId;
}

async function streamReply(thread: Thread, stream: ChatStream, sentAt: number): Promise<void> {
  const view = assistantMessage(thread);
  view.node.dataset.taskId = stream.taskId;
  view.node.dataset.state = 'waiting';
  view.meta.replaceChildren(
    ...(stream.ack.status === 'cached' ? [el('span', 'badge cached', '⚡ cached')] : []),
    el('span', 'ttft', 'waiting for the first token…'),
  );
  scrollToEnd(true);
  let ttftMs: number | null = null;
  try {
    // The iterator starts at the first delta whenever it is taken, and never repeats one across reconnects.
    for await (const chunk of stream) {
      if (ttftMs === null) {
        ttftMs = performance.now() - sentAt;
        view.node.dataset.state = 'streaming';
        const ttft = view.meta.querySelector('.ttft');
        if (ttft) ttft.textContent = `first token ${Math.round(ttftMs)} ms`;
      }
      view.text.append(chunk);
      scrollToEnd();
    }
    const result = await stream.result;
    view.node.dataset.state = result.finishReason === 'cancelled' ? 'cancelled' : 'done';
    describeFinish(result, view, ttftMs);
  } catch (err) {
    if (err instanceof ChatwireError) {
      view.node.dataset.state = 'error';
      view.meta.replaceChildren(el('span', 'error-text', `${err.message}${err.retryable ? ' (you can send it again)' : ''}`));
      return;
    }
    // A reply this page cannot show: keep the text it has, say so, and let the boundary report the cause.
    view.node.dataset.state = 'unreadable';
    view.meta.replaceChildren(el('span', 'error-text', 'the details of this reply could not be shown'));
    throw err;
  }
}

function failedSend(mine: HTMLElement, text: string, err: ChatwireError): void {
  mine.dataset.state = 'failed';
  const meta = el('div', 'meta', err.code === 'aborted' ? 'Not sent.' : `Not sent: ${err.message}.`);
  const again = el('button', 'linkish', 'edit and resend');
  again.type = 'button';
  again.addEventListener('click', () => {
    ui.input.value = text;
    autosize();
    ui.input.focus();
  });
  meta.append(again);
  mine.append(meta);
}

async function submit(): Promise<void> {
  const text = ui.input.value.trim();
  if (text === '' || busy) return;
  ui.input.value = '';
  autosize();
  const thread = current;
  const mine = userMessage(thread, text);
  mine.dataset.state = 'pending';
  scrollToEnd(true);
  setBusy(true);
  try {
    const abort = new AbortController();
    pendingAbort = abort;
    const sentAt = performance.now();
    const maxTokens = readMaxTokens();
    let stream: ChatStream;
    try {
      stream = await client.chat.send(text, {
        ...(thread.conversationId === null ? {} : { conversationId: thread.conversationId }),
        ...(maxTokens === undefined ? {} : { params: { maxTokens } }),
        ...(ui.skipCache.checked ? { cache: 'bypass' as const } : {}),
        retryOnRateLimit: { maxWaitMs: 120_000 },
        onRateLimited: (wait) => showCountdown(wait.retryAt),
        signal: abort.signal,
      });
    } catch (err) {
      if (!(err instanceof ChatwireError)) throw err;
      failedSend(mine, text, err);
      return;
    } finally {
      pendingAbort = null;
      hideCountdown();
    }
    mine.dataset.state = 'sent';
    mine.dataset.messageId = stream.messageId;
    if (thread.conversationId === null) {
      thread.conversationId = stream.conversationId;
      threads.set(stream.conversationId, thread);
      if (current === thread) client.chat.follow(stream.conversationId);
    }
    touchConversation(stream.conversationId, text.length > 60 ? `${text.slice(0, 57)}…` : text);
    if (current === thread) setTitle();
    activeStream = stream;
    await streamReply(thread, stream, sentAt);
  } finally {
    activeStream = null;
    setBusy(false);
  }
}

function autosize(): void {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${ui.input.scrollHeight}px`;
}

ui.form.addEventListener(
  'submit',
  guard('Something went wrong', (event: SubmitEvent) => {
    event.preventDefault();
    return submit();
  }),
);
ui.input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.input.addEventListener('input', autosize);
ui.stop.addEventListener(
  'click',
  guard('Stopping the reply failed', async () => {
    if (pendingAbort) pendingAbort.abort();
    await activeStream?.cancel();
  }),
);
ui.rateLimitCancel.addEventListener('click', () => pendingAbort?.abort());
ui.newChat.addEventListener(
  'click',
  guard('Starting a new chat failed', () => showThread(null)),
);

guard('Starting the page failed', () => showThread(null))();
