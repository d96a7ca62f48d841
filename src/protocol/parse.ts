import { AppError, badRequestFromZod } from './errors.js';
import { ClientMessageSchema, clientMessageTypes, type ChatSend, type ClientMessage } from './messages.js';

export type ParseResult = { ok: true; message: ClientMessage } | { ok: false; error: AppError; id: string | undefined };

function echoableId(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const id = (value as Record<string, unknown>).id;
  return typeof id === 'string' && id.length > 0 && id.length <= 64 ? id : undefined;
}

type ChatParams = NonNullable<ChatSend['params']>;

const CHAT_SEND_KEYS = new Set(['type', 'id', 'text', 'conversationId', 'model', 'params', 'cache', 'clientMessageId']);
const CHAT_PARAMS_KEYS = new Set(['temperature', 'maxTokens', 'system']);
const CACHE_MODES = new Set(['use', 'bypass', 'refresh']);
const CLIENT_MESSAGE_ID = /^[A-Za-z0-9._:-]+$/;

/** 1..max UTF-16 units: within the schema's 1..max code points. A longer string is left to zod, which counts code points. */
function fits(value: unknown, max: number): value is string {
  return typeof value === 'string' && value.length >= 1 && value.length <= max;
}

/** Whether every own key of `value` is one of `keys` and none is undefined (which zod would keep as a key). */
function knownKeys(value: Record<string, unknown>, keys: Set<string>): boolean {
  for (const key in value) if (!keys.has(key) || value[key] === undefined) return false;
  return true;
}

function plainParams(value: unknown): ChatParams | null {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return null;
  const p = value as Record<string, unknown>;
  if (!knownKeys(p, CHAT_PARAMS_KEYS)) return null;
  const params: ChatParams = {};
  const { temperature, maxTokens, system } = p;
  if (temperature !== undefined) {
    if (typeof temperature !== 'number' || !(temperature >= 0 && temperature <= 2)) return null;
    params.temperature = temperature;
  }
  if (maxTokens !== undefined) {
    if (!Number.isInteger(maxTokens) || !((maxTokens as number) >= 1 && (maxTokens as number) <= 4096)) return null;
    params.maxTokens = maxTokens as number;
  }
  if (system !== undefined) {
    if (typeof system !== 'string' || system.length > 8000) return null;
    params.system = system;
  }
  return params;
}

/**
 * A chat.send that ChatSendSchema accepts, checked without zod: the frame that starts a model call, whose parse was
 * the largest step of the main thread's way to the hand-over. Gives what the schema gives (a copy, keys in its
 * order); null for anything it is not sure of, which zod then decides (and words the refusal of).
 */
export function plainChatSend(value: Record<string, unknown>): ChatSend | null {
  if (value.type !== 'chat.send' || !knownKeys(value, CHAT_SEND_KEYS)) return null;
  const { id, text, conversationId, model, params, cache, clientMessageId } = value;
  if (!fits(text, 16000) || (id !== undefined && !fits(id, 64))) return null;
  const message: ChatSend = id === undefined ? { type: 'chat.send', text } : { type: 'chat.send', id, text };
  if (conversationId !== undefined) {
    if (!fits(conversationId, 128)) return null;
    message.conversationId = conversationId;
  }
  if (model !== undefined) {
    if (!fits(model, 128)) return null;
    message.model = model;
  }
  if (params !== undefined) {
    const checked = plainParams(params);
    if (checked === null) return null;
    message.params = checked;
  }
  if (cache !== undefined) {
    if (typeof cache !== 'string' || !CACHE_MODES.has(cache)) return null;
    message.cache = cache as ChatSend['cache'];
  }
  if (clientMessageId !== undefined) {
    if (!fits(clientMessageId, 64) || !CLIENT_MESSAGE_ID.test(clientMessageId)) return null;
    message.clientMessageId = clientMessageId;
  }
  return message;
}

/** Validates an already-decoded value as a client message. */
export function validateClientMessage(value: unknown): ParseResult {
  const id = echoableId(value);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { ok: false, id, error: new AppError('bad_request', 'a message must be a JSON object') };
  }
  const type = (value as Record<string, unknown>).type;
  if (typeof type !== 'string') {
    return { ok: false, id, error: new AppError('bad_request', 'a message needs a string "type"', { details: [{ path: 'type', message: 'required' }] }) };
  }
  if (!(clientMessageTypes as string[]).includes(type)) {
    return {
      ok: false,
      id,
      error: new AppError('bad_request', `unknown message type "${type.slice(0, 64)}"`, {
        details: [{ path: 'type', message: `expected one of ${clientMessageTypes.join(', ')}` }],
      }),
    };
  }
  const plain = type === 'chat.send' ? plainChatSend(value as Record<string, unknown>) : null;
  if (plain !== null) return { ok: true, message: plain };
  const parsed = ClientMessageSchema.safeParse(value);
  if (!parsed.success) return { ok: false, id, error: badRequestFromZod(parsed.error, type) };
  return { ok: true, message: parsed.data };
}
