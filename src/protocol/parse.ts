import { AppError, badRequestFromZod } from './errors.js';
import {
  CacheModeSchema,
  CLIENT_MESSAGE_ID_PATTERN,
  ChatParamsSchema,
  ChatSendSchema,
  ClientMessageSchema,
  clientMessageTypes,
  type ChatSend,
  type ClientMessage,
} from './messages.js';

export type ParseResult = { ok: true; message: ClientMessage } | { ok: false; error: AppError; id: string | undefined };

function echoableId(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const id = (value as Record<string, unknown>).id;
  return typeof id === 'string' && id.length > 0 && id.length <= 64 ? id : undefined;
}

type ChatParams = NonNullable<ChatSend['params']>;

// The fast check's bounds are read from the schemas, so the two cannot drift apart.
const SEND = ChatSendSchema.shape;
const PARAMS = ChatParamsSchema.shape;
const CHAT_SEND_KEYS = new Set(Object.keys(SEND));
const CHAT_PARAMS_KEYS = new Set(Object.keys(PARAMS));
const CACHE_MODES = new Set<string>(CacheModeSchema.options);

interface Length {
  min: number;
  max: number;
}
const lengthOf = (schema: { minLength: number | null; maxLength: number | null }): Length => ({
  min: schema.minLength ?? 0,
  max: schema.maxLength ?? Number.POSITIVE_INFINITY,
});
const TEXT = lengthOf(SEND.text);
const ID = lengthOf(SEND.id.unwrap());
const CONVERSATION_ID = lengthOf(SEND.conversationId.unwrap());
const MODEL = lengthOf(SEND.model.unwrap());
const CLIENT_MESSAGE_ID = lengthOf(SEND.clientMessageId.unwrap());
const SYSTEM = lengthOf(PARAMS.system.unwrap());
const TEMPERATURE = PARAMS.temperature.unwrap();
const MAX_TOKENS = PARAMS.maxTokens.unwrap();

/**
 * Within the schema's length, counted in code points, judged from UTF-16 units: a string has no more code points
 * than units, so `max` units fit; at least `min` units mean at least `min` code points only for a `min` of 0 or 1
 * (a larger one is left to zod, as is a string longer in units than `max`).
 */
function fits(value: unknown, { min, max }: Length): value is string {
  return typeof value === 'string' && min <= 1 && value.length >= min && value.length <= max;
}

/** Within the number schema's bounds (and an integer where it asks for one). */
function inRange(value: unknown, schema: typeof TEMPERATURE | typeof MAX_TOKENS): value is number {
  if (typeof value !== 'number' || (schema.isInt && !Number.isInteger(value))) return false;
  return value >= (schema.minValue ?? Number.NEGATIVE_INFINITY) && value <= (schema.maxValue ?? Number.POSITIVE_INFINITY);
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
    if (!inRange(temperature, TEMPERATURE)) return null;
    params.temperature = temperature;
  }
  if (maxTokens !== undefined) {
    if (!inRange(maxTokens, MAX_TOKENS)) return null;
    params.maxTokens = maxTokens;
  }
  if (system !== undefined) {
    if (!fits(system, SYSTEM)) return null;
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
  if (!fits(text, TEXT) || (id !== undefined && !fits(id, ID))) return null;
  const message: ChatSend = id === undefined ? { type: 'chat.send', text } : { type: 'chat.send', id, text };
  if (conversationId !== undefined) {
    if (!fits(conversationId, CONVERSATION_ID)) return null;
    message.conversationId = conversationId;
  }
  if (model !== undefined) {
    if (!fits(model, MODEL)) return null;
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
    if (!fits(clientMessageId, CLIENT_MESSAGE_ID) || !CLIENT_MESSAGE_ID_PATTERN.test(clientMessageId)) return null;
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
