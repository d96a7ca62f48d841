import { z } from 'zod';
import { ErrorCodeSchema } from './errors.js';

/** Wire protocol version, sent in `hello`. */
export const PROTOCOL_VERSION = 1;

// ---------- shared pieces ----------

const Id = z.string().min(1).max(64);
const OpaqueId = z.string().min(1).max(128);
const IsoTime = z.string();

export const ChatParamsSchema = z.strictObject({
  temperature: z.number().min(0).max(2).optional(),
  maxTokens: z.number().int().min(1).max(4096).optional(),
  system: z.string().max(8000).optional(),
});

export const CacheModeSchema = z.enum(['use', 'bypass', 'refresh']);
export const RequestStatusSchema = z.enum(['open', 'booked', 'closed']);
export const BookingStatusSchema = z.enum(['pending', 'confirmed', 'completed', 'cancelled']);
export const TaskStatusSchema = z.enum(['queued', 'running', 'done', 'error', 'cancelled']);
export const FinishReasonSchema = z.enum(['stop', 'length', 'cancelled']);
export const RoleSchema = z.enum(['consumer', 'provider', 'staff']);

/** A page size. A JSON number on the sockets, never coerced: `true` or `"3"` fail the schema (HTTP parses its query strings itself). */
export const LimitSchema = z.number().int().min(1).max(100);
const Cursor = z.string().min(1).max(256);

// ---------- client to server ----------

/** The characters of a `clientMessageId` or `Idempotency-Key`. */
export const CLIENT_MESSAGE_ID_PATTERN = /^[A-Za-z0-9._:-]+$/;
/** A `clientMessageId` or `Idempotency-Key`: 1..64 chars of `A-Za-z0-9._:-`. */
export const ClientMessageIdSchema = z.string().min(1).max(64).regex(CLIENT_MESSAGE_ID_PATTERN, 'expected 1..64 chars of A-Za-z0-9._:-');

export const ChatSendFields = {
  text: z.string().min(1).max(16000),
  conversationId: OpaqueId.optional(),
  model: z.string().min(1).max(128).optional(),
  params: ChatParamsSchema.optional(),
  cache: CacheModeSchema.optional(),
  /** Makes the send safe to retry (PROTOCOL.md, "Sync and idempotency"). */
  clientMessageId: ClientMessageIdSchema.optional(),
};

export const ChatSendSchema = z.strictObject({ type: z.literal('chat.send'), id: Id.optional(), ...ChatSendFields });
/** `POST /v1/chat` body: `chat.send` without `type`. */
export const ChatSendBodySchema = z.strictObject({ id: Id.optional(), ...ChatSendFields });

export const ChatCancelSchema = z.strictObject({ type: z.literal('chat.cancel'), id: Id.optional(), taskId: OpaqueId });
export const ChatResumeSchema = z.strictObject({
  type: z.literal('chat.resume'),
  id: Id.optional(),
  taskId: OpaqueId,
  fromSeq: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
});
export const TaskGetSchema = z.strictObject({ type: z.literal('task.get'), id: Id.optional(), taskId: OpaqueId });

export const HistoryQueryFields = {
  conversationId: OpaqueId,
  before: OpaqueId.optional(),
  limit: LimitSchema.optional(),
};
export const ConversationHistorySchema = z.strictObject({
  type: z.literal('conversation.history'),
  id: Id.optional(),
  ...HistoryQueryFields,
});

export const RequestsListFields = {
  status: RequestStatusSchema.optional(),
  category: z.string().min(1).max(64).optional(),
  limit: LimitSchema.optional(),
  cursor: Cursor.optional(),
};
export const RequestsListSchema = z.strictObject({ type: z.literal('requests.list'), id: Id.optional(), ...RequestsListFields });

export const ConsumerPageFields = {
  consumerId: OpaqueId,
  limit: LimitSchema.optional(),
  cursor: Cursor.optional(),
};
export const ConsumerRequestsSchema = z.strictObject({
  type: z.literal('consumer.requests'),
  id: Id.optional(),
  ...ConsumerPageFields,
});
export const ConsumerBookingsSchema = z.strictObject({
  type: z.literal('consumer.bookings'),
  id: Id.optional(),
  ...ConsumerPageFields,
});
export const ConversationsListFields = {
  limit: LimitSchema.optional(),
  // Longer than the marketplace's: it holds a conversation id (up to 128 chars of any kind, the AI SDK's chat ids).
  cursor: z.string().min(1).max(1500).optional(),
};
export const ConversationsListSchema = z.strictObject({
  type: z.literal('conversations.list'),
  id: Id.optional(),
  ...ConversationsListFields,
});
export const PingSchema = z.strictObject({ type: z.literal('ping'), id: Id.optional() });

export const ClientMessageSchema = z.discriminatedUnion('type', [
  ChatSendSchema,
  ChatCancelSchema,
  ChatResumeSchema,
  TaskGetSchema,
  ConversationHistorySchema,
  RequestsListSchema,
  ConsumerRequestsSchema,
  ConsumerBookingsSchema,
  ConversationsListSchema,
  PingSchema,
]);

export const clientMessageTypes = ClientMessageSchema.options.map((o) => o.shape.type.value);

// ---------- server to client ----------

export const RateLimitInfoSchema = z.object({
  limit: z.number().int(),
  remaining: z.number().int(),
  resetMs: z.number().int(),
});

export const HelloSchema = z.object({
  type: z.literal('hello'),
  connectionId: z.string(),
  userId: z.string(),
  protocol: z.literal(PROTOCOL_VERSION),
  provider: z.string(),
  model: z.string(),
  limits: z.object({
    maxFrameBytes: z.number().int(),
    messagesPerSecond: z.number(),
    chatsPerMinute: z.number(),
  }),
  /** The serving process: one per chatwire instance, so in cluster mode each node has its own. */
  nodeId: z.string(),
});

export const ChatAckSchema = z.object({
  type: z.literal('chat.ack'),
  id: Id.optional(),
  taskId: z.string(),
  conversationId: z.string(),
  messageId: z.string(),
  status: z.enum(['queued', 'cached']),
  rateLimit: RateLimitInfoSchema,
  /** `true` when this answers a repeated `clientMessageId` / `Idempotency-Key`: the first send's ack again. */
  duplicate: z.literal(true).optional(),
});

/** Server-initiated: a chat of this user was acknowledged on another connection (or over HTTP). */
export const ChatStartedSchema = z.object({
  type: z.literal('chat.started'),
  taskId: z.string(),
  conversationId: z.string(),
  messageId: z.string(),
  text: z.string(),
  createdAt: IsoTime,
});

export const ChatDeltaSchema = z.object({
  type: z.literal('chat.delta'),
  taskId: z.string(),
  seq: z.number().int().min(0),
  text: z.string(),
});

export const UsageSchema = z.object({
  promptTokens: z.number().int().min(0),
  completionTokens: z.number().int().min(0),
});

export const ChatDoneSchema = z.object({
  type: z.literal('chat.done'),
  taskId: z.string(),
  messageId: z.string(),
  finishReason: FinishReasonSchema,
  usage: UsageSchema,
  cached: z.boolean(),
  timings: z.object({
    queueMs: z.number().min(0),
    firstTokenMs: z.number().min(0).nullable(),
    totalMs: z.number().min(0),
  }),
});

export const ChatErrorSchema = z.object({
  type: z.literal('chat.error'),
  taskId: z.string(),
  code: ErrorCodeSchema,
  message: z.string(),
  retryable: z.boolean(),
});

export const TaskInfoSchema = z.object({
  taskId: z.string(),
  conversationId: z.string(),
  status: TaskStatusSchema,
  seq: z.number().int().min(0),
  text: z.string(),
  createdAt: IsoTime,
});
export const TaskSchema = z.object({ type: z.literal('task'), id: Id.optional(), task: TaskInfoSchema });

export const HistoryMessageSchema = z.object({
  messageId: z.string(),
  role: z.enum(['user', 'assistant']),
  text: z.string(),
  createdAt: IsoTime,
});
export const ConversationHistoryReplySchema = z.object({
  type: z.literal('conversation.history'),
  id: Id.optional(),
  messages: z.array(HistoryMessageSchema),
  hasMore: z.boolean(),
});

export const ConsumerRefSchema = z.object({ consumerId: z.string(), name: z.string() });
export const ProviderRefSchema = z.object({ providerId: z.string(), name: z.string(), rating: z.number() });

const RequestFields = {
  requestId: z.string(),
  consumerId: z.string(),
  title: z.string(),
  category: z.string(),
  status: RequestStatusSchema,
  createdAt: IsoTime,
};

export const RequestItemSchema = z.object({
  ...RequestFields,
  consumer: ConsumerRefSchema,
  quoteCount: z.number().int().min(0),
});
export const RequestsListReplySchema = z.object({
  type: z.literal('requests.list'),
  id: Id.optional(),
  items: z.array(RequestItemSchema),
  nextCursor: z.string().nullable(),
});

const BookingFields = {
  bookingId: z.string(),
  status: BookingStatusSchema,
  scheduledAt: IsoTime,
  priceCents: z.number().int(),
};

export const RequestBookingSchema = z.object({
  ...BookingFields,
  provider: ProviderRefSchema,
});
export const ConsumerRequestItemSchema = z.object({
  ...RequestFields,
  bookings: z.array(RequestBookingSchema),
});
export const ConsumerRequestsReplySchema = z.object({
  type: z.literal('consumer.requests'),
  id: Id.optional(),
  items: z.array(ConsumerRequestItemSchema),
  nextCursor: z.string().nullable(),
});

export const ConsumerBookingItemSchema = z.object({
  ...BookingFields,
  request: z.object({ requestId: z.string(), title: z.string(), category: z.string() }),
  provider: ProviderRefSchema,
});
export const ConsumerBookingsReplySchema = z.object({
  type: z.literal('consumer.bookings'),
  id: Id.optional(),
  items: z.array(ConsumerBookingItemSchema),
  nextCursor: z.string().nullable(),
});

export const ConversationItemSchema = z.object({
  conversationId: z.string(),
  title: z.string(),
  lastMessageAt: IsoTime,
  messageCount: z.number().int().min(0),
});
export const ConversationsListReplySchema = z.object({
  type: z.literal('conversations.list'),
  id: Id.optional(),
  items: z.array(ConversationItemSchema),
  nextCursor: z.string().nullable(),
});

export const OkSchema = z.object({ type: z.literal('ok'), id: Id.optional() });
export const PongSchema = z.object({ type: z.literal('pong'), id: Id.optional() });

export const ErrorDetailSchema = z.object({ path: z.string(), message: z.string() });
export const ErrorMessageSchema = z.object({
  type: z.literal('error'),
  id: Id.optional(),
  code: ErrorCodeSchema,
  message: z.string(),
  retryAfterMs: z.number().int().min(0).optional(),
  details: z.array(ErrorDetailSchema).optional(),
});

export const ServerMessageSchema = z.discriminatedUnion('type', [
  HelloSchema,
  ChatAckSchema,
  ChatDeltaSchema,
  ChatDoneSchema,
  ChatErrorSchema,
  TaskSchema,
  ConversationHistoryReplySchema,
  RequestsListReplySchema,
  ConsumerRequestsReplySchema,
  ConsumerBookingsReplySchema,
  ConversationsListReplySchema,
  ChatStartedSchema,
  OkSchema,
  PongSchema,
  ErrorMessageSchema,
]);

/** HTTP error body: `{"error": {"code", "message", "retryAfterMs?", "details?"}}`. */
export const HttpErrorBodySchema = z.object({
  error: z.object({
    code: ErrorCodeSchema,
    message: z.string(),
    retryAfterMs: z.number().int().min(0).optional(),
    details: z.array(ErrorDetailSchema).optional(),
  }),
});

// ---------- types ----------

export type ChatParams = z.infer<typeof ChatParamsSchema>;
export type CacheMode = z.infer<typeof CacheModeSchema>;
export type TaskStatus = z.infer<typeof TaskStatusSchema>;
export type FinishReason = z.infer<typeof FinishReasonSchema>;
export type Role = z.infer<typeof RoleSchema>;
export type ClientMessage = z.infer<typeof ClientMessageSchema>;
export type ClientMessageType = ClientMessage['type'];
export type ChatSend = z.infer<typeof ChatSendSchema>;
export type ChatSendBody = z.infer<typeof ChatSendBodySchema>;
export type RequestsListQuery = Omit<z.infer<typeof RequestsListSchema>, 'type' | 'id'>;
export type ConsumerPageQuery = Omit<z.infer<typeof ConsumerRequestsSchema>, 'type' | 'id'>;
export type ConversationsListQuery = Omit<z.infer<typeof ConversationsListSchema>, 'type' | 'id'>;
export type ConversationItem = z.infer<typeof ConversationItemSchema>;
export type ChatStarted = z.infer<typeof ChatStartedSchema>;
export type HistoryQuery = Omit<z.infer<typeof ConversationHistorySchema>, 'type' | 'id'>;
export type ServerMessage = z.infer<typeof ServerMessageSchema>;
export type Hello = z.infer<typeof HelloSchema>;
export type ChatAck = z.infer<typeof ChatAckSchema>;
export type ChatDelta = z.infer<typeof ChatDeltaSchema>;
export type ChatDone = z.infer<typeof ChatDoneSchema>;
export type ChatError = z.infer<typeof ChatErrorSchema>;
export type Usage = z.infer<typeof UsageSchema>;
export type TaskInfo = z.infer<typeof TaskInfoSchema>;
export type HistoryMessage = z.infer<typeof HistoryMessageSchema>;
export type RateLimitInfo = z.infer<typeof RateLimitInfoSchema>;
export type RequestItem = z.infer<typeof RequestItemSchema>;
export type ConsumerRequestItem = z.infer<typeof ConsumerRequestItemSchema>;
export type ConsumerBookingItem = z.infer<typeof ConsumerBookingItemSchema>;
export type ErrorMessage = z.infer<typeof ErrorMessageSchema>;
export type Page<T> = { items: T[]; nextCursor: string | null };

/**
 * A value whose JSON text is already built (a marketplace page, serialized by
 * SQLite): the transports write `json` where they would write
 * JSON.stringify(value).
 */
export class JsonText {
  constructor(readonly json: string) {}
}

/** A server message as JsonText; `type` names it for the transports that need the name apart (socket.io's event name). */
export class SerializedMessage extends JsonText {
  constructor(
    readonly type: ServerMessage['type'],
    json: string,
  ) {
    super(json);
  }
}

/** What a transport sends: a message, or one already serialized. */
export type OutgoingMessage = ServerMessage | SerializedMessage;

/** The JSON text of a value that may already be JsonText. */
export function toJson(value: unknown): string {
  return value instanceof JsonText ? value.json : JSON.stringify(value);
}

/** A page whose items are the JSON text of the items array. */
export interface SerializedPage {
  itemsJson: string;
  nextCursor: string | null;
}

/**
 * The JSON text of a page: `{"items":...,"nextCursor":...}` (an HTTP body),
 * or with `type` first and `id` last, the reply frame (the member order of
 * JSON.stringify({ type, ...page, id })).
 */
export function serializePage(page: SerializedPage, type?: ServerMessage['type'], id?: string): string {
  let json = type === undefined ? '{' : `{"type":${JSON.stringify(type)},`;
  json += `"items":${page.itemsJson},"nextCursor":${JSON.stringify(page.nextCursor)}`;
  if (id !== undefined) json += `,"id":${JSON.stringify(id)}`;
  return `${json}}`;
}

/** A serialized page as objects (in-process callers and tests). */
export function parsePage<T>(page: SerializedPage): Page<T> {
  return { items: JSON.parse(page.itemsJson) as T[], nextCursor: page.nextCursor };
}
