/**
 * Generates the API docs from the zod schemas in src/protocol (the one source
 * of truth): the generated sections of docs/protocol.md (between
 * `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; the prose around
 * them is hand-written and kept), docs/openapi.json (OpenAPI 3.1, served at
 * /openapi.json), and the size section of docs/client.md.
 *
 * Usage: node dist/scripts/gen-docs.js [--check]
 * --check writes nothing and exits 1 when a file is stale.
 * test/unit/docs.test.ts runs renderDocs() in memory and fails when the files differ.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gzipSync } from 'node:zlib';
import ts from 'typescript';
import { z } from 'zod';
import {
  AiSdkChatBodySchema,
  AiSdkStreamChunkSchema,
  AppError,
  ChatAckSchema,
  ChatDeltaSchema,
  ChatDoneSchema,
  ChatErrorSchema,
  ChatSendBodySchema,
  ClientMessageSchema,
  ConsumerBookingItemSchema,
  ConsumerBookingsReplySchema,
  ConversationsListFields,
  ConversationsListReplySchema,
  ConsumerPageFields,
  ConsumerRequestItemSchema,
  ConsumerRequestsReplySchema,
  ConversationHistoryReplySchema,
  ErrorDetailSchema,
  ErrorMessageSchema,
  errorCatalogue,
  errorCodes,
  HistoryMessageSchema,
  HistoryQueryFields,
  HttpErrorBodySchema,
  OpenAIAppError,
  OpenAIChatChunkSchema,
  OpenAIChatCompletionSchema,
  OpenAIChatRequestSchema,
  OpenAIErrorBodySchema,
  OpenAIModelListSchema,
  openAIErrorBody,
  RateLimitInfoSchema,
  RequestItemSchema,
  RequestsListFields,
  RequestsListReplySchema,
  ServerMessageSchema,
  TaskInfoSchema,
  type AiSdkChatBody,
  type AiSdkStreamChunk,
  type ClientMessage,
  type ClientMessageType,
  type ErrorCode,
  type ServerMessage,
} from '../src/protocol/index.js';

type Json = Record<string, unknown>;

// ---------- examples (typed from the schemas, and parsed by them at generation) ----------

const TASK = 'task_Vq3b9TQ0ZkXcP1mN2rS4tA';
const CONV = 'conv_7DWYp5ZEn93oLyCg';
const RATE = { limit: 60, remaining: 59, resetMs: 1000 };

const clientExamples: { [K in ClientMessageType]: Extract<ClientMessage, { type: K }> } = {
  'chat.send': { type: 'chat.send', id: 'q1', text: 'Can someone fix a leaking tap tomorrow?', params: { maxTokens: 64 } },
  'chat.cancel': { type: 'chat.cancel', id: 'q2', taskId: TASK },
  'chat.resume': { type: 'chat.resume', id: 'q3', taskId: TASK, fromSeq: 12 },
  'task.get': { type: 'task.get', id: 'q4', taskId: TASK },
  'conversation.history': { type: 'conversation.history', id: 'q5', conversationId: CONV, limit: 20 },
  'requests.list': { type: 'requests.list', id: 'q6', status: 'open', category: 'plumbing', limit: 20 },
  'consumer.requests': { type: 'consumer.requests', id: 'q7', consumerId: 'c_0000000001', limit: 10 },
  'consumer.bookings': { type: 'consumer.bookings', id: 'q8', consumerId: 'c_0000000001', limit: 10 },
  'conversations.list': { type: 'conversations.list', id: 'q10', limit: 20 },
  ping: { type: 'ping', id: 'q9' },
};

/** What each client message is answered with (its `type`). */
const directReply: { [K in ClientMessageType]: ServerMessage['type'] } = {
  'chat.send': 'chat.ack',
  'chat.cancel': 'ok',
  'chat.resume': 'ok',
  'task.get': 'task',
  'conversation.history': 'conversation.history',
  'requests.list': 'requests.list',
  'consumer.requests': 'consumer.requests',
  'consumer.bookings': 'consumer.bookings',
  'conversations.list': 'conversations.list',
  ping: 'pong',
};

const clientPurpose: { [K in ClientMessageType]: string } = {
  'chat.send': 'Sends a user message. The ack comes as soon as it is stored; the reply follows as `chat.delta` frames and one `chat.done` or `chat.error`.',
  'chat.cancel': 'Stops a running task; it ends with `chat.done` `finishReason: cancelled` and the text so far is stored.',
  'chat.resume': 'After a reconnect: replays the deltas from `fromSeq` (the last seq seen + 1), then continues live.',
  'task.get': 'A snapshot of a task: status, deltas so far (`seq`) and text so far.',
  'conversation.history': 'A page of a conversation, oldest first; `before` (a messageId) pages back.',
  'requests.list': 'Service requests, newest first, with their consumer and quote count.',
  'consumer.requests': "A consumer's requests with their bookings (a consumer reads only its own; staff any).",
  'consumer.bookings': "A consumer's bookings with their request and provider.",
  'conversations.list':
    "The caller's conversations, newest activity first (`lastMessageAt` then `conversationId`, both descending); `title` is the first user message cut to at most 80 characters; `cursor` is the previous page's `nextCursor`.",
  ping: 'Keep-alive and round-trip check.',
};

const serverPurpose: { [K in ServerMessage['type']]: string } = {
  hello: 'The first frame on every connection: who you are, what serves you, and the limits.',
  'chat.ack': 'The direct reply to `chat.send`: the message is stored and the task exists.',
  'chat.delta': 'Reply text, in order: `seq` 0, 1, 2, … with no gap per task; one delta can hold several tokens.',
  'chat.done': 'The end of a task that produced a reply (also a cancelled one); the reply is stored as `messageId`.',
  'chat.error': 'The end of a task that failed after its ack.',
  task: 'The direct reply to `task.get`. Times are ISO-8601 strings in UTC.',
  'conversation.history': 'The direct reply to `conversation.history`.',
  'requests.list': 'The direct reply to `requests.list`; `nextCursor` is null at the end.',
  'consumer.requests': 'The direct reply to `consumer.requests`.',
  'consumer.bookings': 'The direct reply to `consumer.bookings`.',
  'conversations.list': 'The direct reply to `conversations.list`; `nextCursor` is null at the end.',
  'chat.started':
    'Sent by the server, not a reply: a chat of this user was acknowledged on another connection (any transport, any node; over HTTP too). Follow its reply with `chat.resume` from seq 0. The connection that sent the chat does not get it.',
  ok: 'The direct reply to `chat.cancel` and `chat.resume`.',
  pong: 'The direct reply to `ping`.',
  error: 'The direct reply to a message that failed; the connection stays open (except after `payload_too_large`).',
};

const provider = { providerId: 'p_000042', name: 'Ace Plumbing', rating: 4.8 };
const serverExamples: { [K in ServerMessage['type']]: Extract<ServerMessage, { type: K }> } = {
  hello: {
    type: 'hello',
    connectionId: 'duA2P0e2LCQ2',
    userId: 'alice',
    protocol: 1,
    provider: 'dev',
    model: 'dev-1',
    limits: { maxFrameBytes: 65536, messagesPerSecond: 50, chatsPerMinute: 60 },
    nodeId: 'n3Qx8ZkLp0aT',
  },
  'chat.ack': { type: 'chat.ack', id: 'q1', taskId: TASK, conversationId: CONV, messageId: 'msg_rMxBFqvEW0iTb-vc', status: 'queued', rateLimit: RATE },
  'chat.delta': { type: 'chat.delta', taskId: TASK, seq: 0, text: 'A licensed plumber' },
  'chat.started': {
    type: 'chat.started',
    taskId: TASK,
    conversationId: CONV,
    messageId: 'msg_rMxBFqvEW0iTb-vc',
    text: 'Can someone fix a leaking tap tomorrow?',
    createdAt: '2026-01-05T09:30:00.000Z',
  },
  'conversations.list': {
    type: 'conversations.list',
    id: 'q10',
    items: [{ conversationId: CONV, title: 'Can someone fix a leaking tap tomorrow?', lastMessageAt: '2026-01-05T09:30:01.000Z', messageCount: 2 }],
    nextCursor: null,
  },
  'chat.done': {
    type: 'chat.done',
    taskId: TASK,
    messageId: 'msg_qucU9Y5oHbp3vkEO',
    finishReason: 'stop',
    usage: { promptTokens: 7, completionTokens: 32 },
    cached: false,
    timings: { queueMs: 0.4, firstTokenMs: 16.2, totalMs: 498.7 },
  },
  'chat.error': { type: 'chat.error', taskId: TASK, code: 'upstream_timeout', message: 'the upstream sent no token within 30000 ms', retryable: true },
  task: {
    type: 'task',
    id: 'q4',
    task: { taskId: TASK, conversationId: CONV, status: 'running', seq: 12, text: 'A licensed plumber can', createdAt: '2026-01-05T09:30:00.000Z' },
  },
  'conversation.history': {
    type: 'conversation.history',
    id: 'q5',
    messages: [
      { messageId: 'msg_rMxBFqvEW0iTb-vc', role: 'user', text: 'Can someone fix a leaking tap tomorrow?', createdAt: '2026-01-05T09:30:00.000Z' },
      { messageId: 'msg_qucU9Y5oHbp3vkEO', role: 'assistant', text: 'A licensed plumber can…', createdAt: '2026-01-05T09:30:01.000Z' },
    ],
    hasMore: false,
  },
  'requests.list': {
    type: 'requests.list',
    id: 'q6',
    items: [
      {
        requestId: 'r_000101',
        consumerId: 'c_0000000001',
        title: 'Leaking kitchen tap',
        category: 'plumbing',
        status: 'open',
        createdAt: '2026-01-05T08:00:00.000Z',
        consumer: { consumerId: 'c_0000000001', name: 'Alice Martin' },
        quoteCount: 3,
      },
    ],
    nextCursor: 'eyJ0IjoiMjAyNi0wMS0wNVQwODowMDowMC4wMDBaIiwiaSI6InJfMDAwMTAxIn0',
  },
  'consumer.requests': {
    type: 'consumer.requests',
    id: 'q7',
    items: [
      {
        requestId: 'r_000101',
        consumerId: 'c_0000000001',
        title: 'Leaking kitchen tap',
        category: 'plumbing',
        status: 'booked',
        createdAt: '2026-01-05T08:00:00.000Z',
        bookings: [{ bookingId: 'b_000900', status: 'confirmed', scheduledAt: '2026-01-06T09:00:00.000Z', priceCents: 12000, provider }],
      },
    ],
    nextCursor: null,
  },
  'consumer.bookings': {
    type: 'consumer.bookings',
    id: 'q8',
    items: [
      {
        bookingId: 'b_000900',
        status: 'confirmed',
        scheduledAt: '2026-01-06T09:00:00.000Z',
        priceCents: 12000,
        request: { requestId: 'r_000101', title: 'Leaking kitchen tap', category: 'plumbing' },
        provider,
      },
    ],
    nextCursor: null,
  },
  ok: { type: 'ok', id: 'q2' },
  pong: { type: 'pong', id: 'q9' },
  error: { type: 'error', id: 'q1', code: 'rate_limited', message: 'too many chats; retry in 950 ms', retryAfterMs: 950 },
};

interface ErrorExample {
  /** What triggers it, in a sentence. */
  trigger: string;
  message: string;
  retryAfterMs?: number;
  details?: { path: string; message: string }[];
  /** Where a WebSocket client sees it: an `error` reply, or a task's `chat.error` (after the ack). */
  ws: 'error' | 'chat.error' | 'upgrade';
}

const errorExamples: Record<ErrorCode, ErrorExample> = {
  bad_request: {
    trigger: '`chat.send` with `params.temperature: 7`',
    message: 'invalid chat.send: params.temperature: Too big: expected number to be <=2',
    details: [{ path: 'params.temperature', message: 'Too big: expected number to be <=2' }],
    ws: 'error',
  },
  unauthorized: {
    trigger: 'an expired token; on /ws the upgrade is refused with HTTP 401 and this body, so no socket opens',
    message: 'token expired',
    ws: 'upgrade',
  },
  forbidden: { trigger: '`task.get` of a task that another user started', message: 'this task belongs to another user', ws: 'error' },
  not_found: { trigger: '`task.get` of a task id that never existed (or was dropped after its retention)', message: `no task ${TASK}`, ws: 'error' },
  payload_too_large: {
    trigger: 'a 70 000-byte frame; the server then closes the WebSocket with 1009 (HTTP: a body over the limit)',
    message: 'frame of 70000 bytes is over the 65536-byte limit',
    ws: 'error',
  },
  rate_limited: { trigger: 'a `chat.send` past `CHATWIRE_CHATS_PER_MINUTE`', message: 'too many chats; retry in 950 ms', retryAfterMs: 950, ws: 'error' },
  idempotency_conflict: {
    trigger: 'a `chat.send` whose `clientMessageId` this user already sent with another text or conversation',
    message: 'clientMessageId m-1 was already used for a different message',
    ws: 'error',
  },
  overloaded: { trigger: 'a `chat.send` while the model queue is full; nothing was stored', message: 'the model queue is full; retry shortly', ws: 'error' },
  node_lost: {
    trigger: 'cluster mode: the node running the task died and its lease lapsed; the task is marked `error`',
    message: 'the node running this task stopped answering',
    ws: 'chat.error',
  },
  upstream_error: {
    trigger: 'the OpenAI-compatible upstream answered HTTP 500 before the first token',
    message: 'the upstream answered HTTP 500',
    ws: 'chat.error',
  },
  upstream_timeout: {
    trigger: 'the upstream sent no token within the first-token timeout',
    message: 'the upstream sent no token within 30000 ms',
    ws: 'chat.error',
  },
  worker_failed: {
    trigger: 'the worker thread running the task crashed; the pool replaces it',
    message: 'the worker running this task died (out of memory)',
    ws: 'chat.error',
  },
  internal: { trigger: 'anything unexpected; the server logs the cause, the message never holds a stack trace', message: 'internal error', ws: 'error' },
};

/** What useChat's DefaultChatTransport sends for a second message of a chat. */
const aiSdkBody: AiSdkChatBody = {
  id: CONV,
  messages: [
    { id: 'Xq2fV7kPz0LmN3bC', role: 'user', parts: [{ type: 'text', text: 'Can someone fix a leaking tap tomorrow?' }] },
    { id: TASK, role: 'assistant', parts: [{ type: 'text', text: 'A licensed plumber can…' }] },
    { id: 'p8dRt4WzY1cVb6Ha', role: 'user', parts: [{ type: 'text', text: 'And on Friday?' }] },
  ],
  trigger: 'submit-message',
};

type AiSdkChunkType = AiSdkStreamChunk['type'];
const aiSdkChunks: { [K in AiSdkChunkType]: Extract<AiSdkStreamChunk, { type: K }> } = {
  start: { type: 'start', messageId: TASK },
  'text-start': { type: 'text-start', id: 'text-0' },
  'text-delta': { type: 'text-delta', id: 'text-0', delta: 'A licensed plumber' },
  'text-end': { type: 'text-end', id: 'text-0' },
  finish: { type: 'finish', finishReason: 'stop' },
  abort: { type: 'abort' },
  error: { type: 'error', errorText: 'upstream_timeout: the upstream sent no token within 30000 ms' },
};

const aiSdkChunkPurpose: { [K in AiSdkChunkType]: string } = {
  start: 'First: the reply message; its id is the task id (also in `x-chatwire-task-id`).',
  'text-start': "Opens the reply's one text part.",
  'text-delta': 'One chatwire delta, in seq order.',
  'text-end': 'Closes the text part, before `finish` or `abort`.',
  finish: 'The task is done; then `[DONE]`.',
  abort: 'The task was cancelled (`POST /api/chat/:chatId/stop`) instead of `finish`; then `[DONE]`.',
  error: 'The task failed after the start: `<code>: <message>` of its chat.error; then `[DONE]`.',
};

/** The SSE text of a stream of these chunks. */
function uiMessageStreamText(types: AiSdkChunkType[]): string {
  return `${types.map((t) => `data: ${JSON.stringify(AiSdkStreamChunkSchema.parse(aiSdkChunks[t]))}\n\n`).join('')}data: [DONE]\n\n`;
}

// ---------- JSON Schema helpers ----------

const SAFE = Number.MAX_SAFE_INTEGER;

/** z.toJSONSchema without the noise: no $schema/$id, no ±MAX_SAFE_INTEGER bounds (they only say "a safe integer"). */
function clean(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(clean);
  if (typeof value !== 'object' || value === null) return value;
  const out: Json = {};
  for (const [k, v] of Object.entries(value)) {
    if (k === '$schema' || k === '$id') continue;
    if ((k === 'maximum' && v === SAFE) || (k === 'minimum' && v === -SAFE)) continue;
    out[k] = clean(v);
  }
  return out;
}

function jsonSchema(schema: z.ZodType, io: 'input' | 'output' = 'output'): Json {
  return clean(z.toJSONSchema(schema, { io })) as Json;
}

function range(min: unknown, max: unknown, unit = ''): string {
  const lo = typeof min === 'number' ? min : undefined;
  const hi = typeof max === 'number' ? max : undefined;
  if (lo !== undefined && hi !== undefined) return `${lo}..${hi}${unit}`;
  if (lo !== undefined) return `≥ ${lo}${unit}`;
  if (hi !== undefined) return `≤ ${hi}${unit}`;
  return '';
}

function describe(s: Json): string {
  if (Array.isArray(s.anyOf)) return (s.anyOf as Json[]).map(describe).join(' or ');
  if ('const' in s) return `\`${JSON.stringify(s.const)}\``;
  if (Array.isArray(s.enum)) return (s.enum as unknown[]).map((v) => `\`${String(v)}\``).join(' / ');
  switch (s.type) {
    case 'string': {
      const r = range(s.minLength, s.maxLength, ' chars');
      return r ? `string (${r})` : 'string';
    }
    case 'integer':
    case 'number': {
      const r = range(s.minimum, s.maximum);
      return r ? `${s.type} ${r}` : String(s.type);
    }
    case 'array': {
      const items = (s.items ?? {}) as Json;
      const objects = items.type === 'object' || (Array.isArray(items.anyOf) && (items.anyOf as Json[]).every((o) => o.type === 'object'));
      return objects ? 'array of objects' : `array of ${describe(items)}`;
    }
    case 'object':
      return 'object';
    case 'null':
      return 'null';
    case 'boolean':
      return 'boolean';
    default:
      return String(s.type ?? 'any');
  }
}

function cell(text: string): string {
  return text.replace(/\|/g, '\\|');
}

/** One row per field, nested objects and arrays of objects flattened as `a.b` and `a[].b`. */
function fieldRows(schema: Json, prefix = ''): string[] {
  const props = (schema.properties ?? {}) as Record<string, Json>;
  const required = new Set((schema.required ?? []) as string[]);
  const rows: string[] = [];
  for (const [name, sub] of Object.entries(props)) {
    if (prefix === '' && name === 'type') continue;
    const field = `${prefix}${name}`;
    rows.push(`| \`${field}\` | ${cell(describe(sub))} | ${required.has(name) ? 'yes' : 'no'} |`);
    if (sub.type === 'object' && sub.properties) rows.push(...fieldRows(sub, `${field}.`));
    const items = sub.items as Json | undefined;
    if (sub.type === 'array' && items?.type === 'object' && items.properties) rows.push(...fieldRows(items, `${field}[].`));
  }
  return rows;
}

function fieldTable(schema: Json): string {
  const rows = fieldRows(schema);
  if (rows.length === 0) return '_No fields besides `type`._';
  return ['| field | type | required |', '|---|---|---|', ...rows].join('\n');
}

function codeBlock(value: unknown, lang = 'json'): string {
  return `\`\`\`${lang}\n${JSON.stringify(value)}\n\`\`\``;
}

// ---------- docs/protocol.md sections ----------

function clientMessagesSection(): string {
  const parts: string[] = [];
  for (const option of ClientMessageSchema.options) {
    const type = option.shape.type.value as ClientMessageType;
    const example = option.parse(clientExamples[type]);
    parts.push(
      `### \`${type}\`\n\n${clientPurpose[type]} Direct reply: \`${directReply[type]}\` (or \`error\`).\n\n${fieldTable(jsonSchema(option, 'input'))}\n\n${codeBlock(example)}`,
    );
  }
  return parts.join('\n\n');
}

function serverMessagesSection(): string {
  const parts: string[] = [];
  for (const option of ServerMessageSchema.options) {
    const type = option.shape.type.value as ServerMessage['type'];
    const example = option.parse(serverExamples[type]);
    parts.push(`### \`${type}\`\n\n${serverPurpose[type]}\n\n${fieldTable(jsonSchema(option))}\n\n${codeBlock(example)}`);
  }
  return parts.join('\n\n');
}

function httpErrorBody(code: ErrorCode): Json {
  const ex = errorExamples[code];
  const error: Json = { code, message: ex.message };
  if (ex.retryAfterMs !== undefined) error.retryAfterMs = ex.retryAfterMs;
  if (ex.details !== undefined) error.details = ex.details;
  return HttpErrorBodySchema.parse({ error }) as Json;
}

function wsErrorFrame(code: ErrorCode): Json | null {
  const ex = errorExamples[code];
  if (ex.ws === 'upgrade') return null;
  if (ex.ws === 'chat.error')
    return ChatErrorSchema.parse({ type: 'chat.error', taskId: TASK, code, message: ex.message, retryable: errorCatalogue[code].retryable }) as Json;
  const frame: Json = { type: 'error', id: 'q1', code, message: ex.message };
  if (ex.retryAfterMs !== undefined) frame.retryAfterMs = ex.retryAfterMs;
  if (ex.details !== undefined) frame.details = ex.details;
  return ErrorMessageSchema.parse(frame) as Json;
}

function errorsSection(): string {
  const table = [
    '| code | when | HTTP |',
    '|---|---|---|',
    ...errorCodes.map((code) => `| \`${code}\` | ${cell(errorCatalogue[code].when)} | ${errorCatalogue[code].status} |`),
  ];
  const examples = errorCodes.map((code) => {
    const { status, retryable } = errorCatalogue[code];
    const frame = wsErrorFrame(code);
    const lines = [
      `### \`${code}\``,
      '',
      `HTTP ${status}; ${retryable ? 'retryable: the same call can succeed later' : 'not retryable: retrying the same call fails the same way'}. Example: ${errorExamples[code].trigger}.`,
      '',
    ];
    if (frame) lines.push(frame.type === 'chat.error' ? 'WebSocket (the task fails after its ack):' : 'WebSocket:', '', codeBlock(frame), '');
    lines.push(
      frame?.type === 'chat.error' ? 'HTTP (as the SSE `error` event of the task stream; the body below is its shape where a route answers with it):' : 'HTTP:',
      '',
      codeBlock(httpErrorBody(code)),
    );
    return lines.join('\n');
  });
  return [table.join('\n'), ...examples].join('\n\n');
}

function httpSection(api: Json): string {
  const rows = ['| method | path | success | errors | does |', '|---|---|---|---|---|'];
  for (const [p, item] of Object.entries(api.paths as Record<string, Record<string, Json>>)) {
    for (const [method, op] of Object.entries(item)) {
      const codes = Object.keys(op.responses as Json);
      const ok = codes.filter((c) => c < '400').join(', ');
      const bad = codes.filter((c) => c >= '400').join(', ');
      rows.push(`| ${method.toUpperCase()} | \`${p}\` | ${ok} | ${bad || '–'} | ${cell(String(op.summary))} |`);
    }
  }
  return rows.join('\n');
}

function aiSdkSection(): string {
  const chunkRows = AiSdkStreamChunkSchema.options.map((option) => {
    const type = option.shape.type.value as AiSdkChunkType;
    const fields = Object.keys(option.shape).filter((k) => k !== 'type');
    return `| \`${type}\` | ${fields.map((f) => `\`${f}\``).join(', ') || '–'} | ${cell(aiSdkChunkPurpose[type])} |`;
  });
  return [
    '### `POST /api/chat` body',
    '',
    fieldTable(jsonSchema(AiSdkChatBodySchema, 'input')),
    '',
    codeBlock(AiSdkChatBodySchema.parse(aiSdkBody)),
    '',
    '### The UI message stream',
    '',
    'One `data: <part JSON>` event per part, then `data: [DONE]`.',
    '',
    '| part `type` | fields | when |',
    '|---|---|---|',
    ...chunkRows,
    '',
    `\`\`\`text\n${uiMessageStreamText(['start', 'text-start', 'text-delta', 'text-end', 'finish']).trimEnd()}\n\`\`\``,
  ].join('\n');
}

// ---------- docs/openapi.json ----------

const ROUTE_ERRORS = {
  chat: ['bad_request', 'unauthorized', 'forbidden', 'not_found', 'payload_too_large', 'rate_limited', 'idempotency_conflict', 'overloaded', 'internal'],
  conversations: ['bad_request', 'unauthorized', 'rate_limited', 'internal'],
  task: ['unauthorized', 'forbidden', 'not_found', 'rate_limited', 'internal'],
  stream: ['bad_request', 'unauthorized', 'forbidden', 'not_found', 'rate_limited', 'internal'],
  history: ['bad_request', 'unauthorized', 'forbidden', 'not_found', 'rate_limited', 'internal'],
  requests: ['bad_request', 'unauthorized', 'rate_limited', 'internal'],
  consumer: ['bad_request', 'unauthorized', 'forbidden', 'not_found', 'rate_limited', 'internal'],
  aiSdkChat: ['bad_request', 'unauthorized', 'forbidden', 'not_found', 'payload_too_large', 'rate_limited', 'idempotency_conflict', 'overloaded', 'internal'],
  aiSdkChatId: ['bad_request', 'unauthorized', 'forbidden', 'rate_limited', 'internal'],
} as const satisfies Record<string, readonly ErrorCode[]>;

/** The Idempotency-Key request header of the routes that start a chat (PROTOCOL.md, "Sync and idempotency"). */
const IDEMPOTENCY_KEY_PARAM = {
  name: 'Idempotency-Key',
  in: 'header',
  required: false,
  description:
    'makes the request safe to retry: for 24 hours a repeat with the same key and the same message gets the first answer again (a stream from its start), with `Idempotent-Replayed: true`, and nothing is stored, run or charged again; the same key for another message is 422 `idempotency_conflict`',
  schema: { type: 'string', pattern: '^[A-Za-z0-9._:-]{1,64}$' },
};

const ref = (name: string) => ({ $ref: `#/components/schemas/${name}` });

function componentSchemas(): Json {
  const registry = z.registry<{ id: string }>();
  const add = (schema: z.ZodType, id: string) => registry.add(schema, { id });
  add(RateLimitInfoSchema, 'RateLimitInfo');
  add(ErrorDetailSchema, 'ErrorDetail');
  add(HistoryMessageSchema, 'HistoryMessage');
  add(RequestItemSchema, 'RequestItem');
  add(ConsumerRequestItemSchema, 'ConsumerRequestItem');
  add(ConsumerBookingItemSchema, 'ConsumerBookingItem');
  add(ChatSendBodySchema, 'ChatSendBody');
  add(ChatAckSchema.omit({ type: true }), 'ChatAck');
  add(TaskInfoSchema, 'TaskInfo');
  add(ConversationHistoryReplySchema.omit({ type: true, id: true }), 'HistoryPage');
  add(RequestsListReplySchema.omit({ type: true, id: true }), 'RequestsPage');
  add(ConsumerRequestsReplySchema.omit({ type: true, id: true }), 'ConsumerRequestsPage');
  add(ConsumerBookingsReplySchema.omit({ type: true, id: true }), 'ConsumerBookingsPage');
  add(ConversationsListReplySchema.omit({ type: true, id: true }), 'ConversationsPage');
  add(ChatDeltaSchema, 'ChatDelta');
  add(ChatDoneSchema, 'ChatDone');
  add(ChatErrorSchema, 'ChatError');
  add(HttpErrorBodySchema, 'ErrorBody');
  add(AiSdkChatBodySchema, 'AiSdkChatBody');
  add(AiSdkStreamChunkSchema, 'AiSdkStreamChunk');
  add(OpenAIChatRequestSchema, 'OpenAIChatRequest');
  add(OpenAIChatCompletionSchema, 'OpenAIChatCompletion');
  add(OpenAIChatChunkSchema, 'OpenAIChatChunk');
  add(OpenAIModelListSchema, 'OpenAIModelList');
  add(OpenAIErrorBodySchema, 'OpenAIErrorBody');
  // Input mode: request bodies stay closed (strict schemas refuse unknown fields), responses stay open to fields a later version adds.
  const out = z.toJSONSchema(registry, { io: 'input', uri: (id) => `#/components/schemas/${id}` }) as { schemas: Json };
  return clean(out.schemas) as Json;
}

function queryParameters(fields: Record<string, z.ZodType>, names: string[]): Json[] {
  const props = (jsonSchema(z.object(fields), 'input').properties ?? {}) as Record<string, Json>;
  return names.map((name) => ({ name, in: 'query', required: false, schema: props[name] }));
}

function errorResponses(codes: readonly ErrorCode[]): Json {
  const out: Json = {};
  for (const code of codes) out[String(errorCatalogue[code].status)] = { $ref: `#/components/responses/Error${errorCatalogue[code].status}` };
  return out;
}

function responseComponents(): Json {
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of errorCodes) byStatus.set(errorCatalogue[code].status, [...(byStatus.get(errorCatalogue[code].status) ?? []), code]);
  const out: Json = {};
  for (const [status, codes] of [...byStatus].sort((a, b) => a[0] - b[0])) {
    const examples: Json = {};
    for (const code of codes) examples[code] = { summary: errorCatalogue[code].when, value: httpErrorBody(code) };
    // Only the /v1 and /api/chat routes use these, and every response of theirs carries the RateLimit fields, errors and 401s included.
    const response: Json = {
      description: codes.map((c) => `\`${c}\``).join(', '),
      headers: status === 429 ? { 'Retry-After': { $ref: '#/components/headers/Retry-After' }, ...rateLimitHeaders() } : rateLimitHeaders(),
      content: { 'application/json': { schema: ref('ErrorBody'), examples } },
    };
    out[`Error${status}`] = response;
  }
  return out;
}

const rateLimitHeaders = () => ({
  RateLimit: { $ref: '#/components/headers/RateLimit' },
  'RateLimit-Policy': { $ref: '#/components/headers/RateLimit-Policy' },
});

function uiMessageStreamResponse(): Json {
  return {
    description:
      'The UI message stream: `data: <part JSON>` events (`start`, `text-start`, `text-delta`…, `text-end`, then `finish`, or `abort` for a cancelled task), then `data: [DONE]`; a failure after the start is an `error` part, then `[DONE]`. Comment lines (`: keep-alive`) keep proxies from timing out.',
    headers: {
      ...rateLimitHeaders(),
      'x-vercel-ai-ui-message-stream': { description: 'the stream format', schema: { const: 'v1' } },
      'x-chatwire-task-id': { description: "the task answering (also the `start` part's messageId)", schema: { type: 'string' } },
    },
    content: {
      'text/event-stream': {
        schema: { type: 'string' },
        example: uiMessageStreamText(['start', 'text-start', 'text-delta', 'text-end', 'finish']),
        'x-events': { message: ref('AiSdkStreamChunk') },
      },
    },
  };
}

function jsonResponse(description: string, schema: string, example: unknown, headers: Json = {}): Json {
  return { description, headers: { ...rateLimitHeaders(), ...headers }, content: { 'application/json': { schema: ref(schema), example } } };
}

const strip = <T extends { type?: unknown; id?: unknown }>(m: T): Omit<T, 'type' | 'id'> => {
  const { type: _t, id: _i, ...rest } = m;
  return rest;
};

// ---------- the OpenAI-compatible routes ----------

const OPENAI_ROUTE_ERRORS = {
  models: ['unauthorized', 'rate_limited', 'internal'],
  completions: [
    'bad_request',
    'unauthorized',
    'forbidden',
    'not_found',
    'payload_too_large',
    'rate_limited',
    'overloaded',
    'node_lost',
    'upstream_error',
    'upstream_timeout',
    'worker_failed',
    'internal',
  ],
} as const satisfies Record<string, readonly ErrorCode[]>;

/** An OpenAI-shaped error body per code, from the chatwire examples; a bad_request names its field. */
function openAIErrorExample(code: ErrorCode): Json {
  if (code === 'bad_request')
    return OpenAIErrorBodySchema.parse(openAIErrorBody(new OpenAIAppError('bad_request', 'n: only n = 1 is supported', { param: 'n' }))) as Json;
  return OpenAIErrorBodySchema.parse(openAIErrorBody(new AppError(code, errorExamples[code].message))) as Json;
}

const MODEL_NOT_FOUND = openAIErrorBody(
  new OpenAIAppError('not_found', 'the model gpt-4o does not exist; GET /v1/models lists the one served here', { param: 'model', code: 'model_not_found' }),
);

function openAIResponseComponents(): Json {
  const codes = [...new Set<ErrorCode>([...OPENAI_ROUTE_ERRORS.models, ...OPENAI_ROUTE_ERRORS.completions])];
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of codes) byStatus.set(errorCatalogue[code].status, [...(byStatus.get(errorCatalogue[code].status) ?? []), code]);
  const out: Json = {};
  for (const [status, list] of [...byStatus].sort((a, b) => a[0] - b[0])) {
    const examples: Json = {};
    for (const code of list) examples[code] = { summary: errorCatalogue[code].when, value: openAIErrorExample(code) };
    if (status === 404) examples.model_not_found = { summary: 'a model that GET /v1/models does not list', value: MODEL_NOT_FOUND };
    const retry =
      status === 429 ? { 'Retry-After': { $ref: '#/components/headers/Retry-After' }, 'retry-after-ms': { $ref: '#/components/headers/retry-after-ms' } } : {};
    out[`OpenAIError${status}`] = {
      description: `${list.map((c) => `\`${c}\``).join(', ')}${status === 404 ? ', `model_not_found`' : ''} in the OpenAI error shape (\`type\` from the status); \`x-should-retry\` says whether a retry can succeed`,
      headers: { ...retry, ...rateLimitHeaders() },
      content: { 'application/json': { schema: ref('OpenAIErrorBody'), examples } },
    };
  }
  return out;
}

function openAIErrorResponses(codes: readonly ErrorCode[]): Json {
  const out: Json = {};
  for (const code of codes) out[String(errorCatalogue[code].status)] = { $ref: `#/components/responses/OpenAIError${errorCatalogue[code].status}` };
  return out;
}

function openAIPaths(): Json {
  const ids = { id: `chatcmpl-${TASK}`, created: 1_767_605_400, model: 'dev-1' };
  const completion = OpenAIChatCompletionSchema.parse({
    ...ids,
    object: 'chat.completion',
    choices: [{ index: 0, message: { role: 'assistant', content: 'A licensed plumber can come tomorrow morning.' }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 9, completion_tokens: 8, total_tokens: 17 },
  });
  const chunk = (choices: unknown[], usage?: unknown) =>
    `data: ${JSON.stringify(OpenAIChatChunkSchema.parse({ ...ids, object: 'chat.completion.chunk', choices, ...(usage === undefined ? {} : { usage }) }))}\n\n`;
  const stream =
    chunk([{ index: 0, delta: { role: 'assistant', content: 'A licensed' }, finish_reason: null }], null) +
    chunk([{ index: 0, delta: { content: ' plumber' }, finish_reason: null }], null) +
    chunk([{ index: 0, delta: {}, finish_reason: 'stop' }], null) +
    chunk([], { prompt_tokens: 9, completion_tokens: 2, total_tokens: 11 }) +
    'data: [DONE]\n\n';
  const header = (name: string) => ({ $ref: `#/components/headers/${name}` });
  const request = OpenAIChatRequestSchema.parse({
    model: 'dev-1',
    messages: [
      { role: 'system', content: 'You help people book home services.' },
      { role: 'user', content: 'Can someone fix a leaking tap tomorrow?' },
    ],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: 64,
  });
  return {
    '/v1/models': {
      get: {
        tags: ['openai'],
        operationId: 'openaiListModels',
        summary: 'OpenAI-compatible: the model chatwire serves',
        responses: {
          '200': jsonResponse('The model list', 'OpenAIModelList', {
            object: 'list',
            data: [{ id: 'dev-1', object: 'model', created: 1_767_605_400, owned_by: 'chatwire' }],
          }),
          ...openAIErrorResponses(OPENAI_ROUTE_ERRORS.models),
        },
      },
    },
    '/v1/chat/completions': {
      post: {
        tags: ['openai'],
        operationId: 'openaiChatCompletion',
        summary: 'OpenAI-compatible chat completion, streamed or not: a chatwire task (see docs/openai.md)',
        description:
          'The last message (role `user`) is the stored user message; the others are its whole context (the stored history is not added). `n` other than 1, `tools`, `tool_choice`, `functions`, `audio`, a `response_format` other than text, or a content part other than text: 400 naming the field; other fields are ignored; null is a field left out. In open mode the `user` field is the user id.',
        parameters: [
          {
            name: 'x-chatwire-conversation-id',
            in: 'header',
            required: false,
            description: "append the exchange to this conversation of the caller's (else a new one)",
            schema: { type: 'string', minLength: 1, maxLength: 128 },
          },
          IDEMPOTENCY_KEY_PARAM,
          { name: 'x-chatwire-cache', in: 'header', required: false, description: 'as `cache` on chat.send', schema: { enum: ['use', 'bypass', 'refresh'] } },
        ],
        requestBody: { required: true, content: { 'application/json': { schema: ref('OpenAIChatRequest'), example: request } } },
        responses: {
          '200': {
            description:
              '`stream` false: the completion. `stream` true: an event stream of `data: <chat.completion.chunk>` (one per delta, the first with the role, then one with `finish_reason`; with `stream_options.include_usage` every chunk has `usage: null` and one more chunk with no choices carries the usage), then `data: [DONE]`; a failure after the start is one `data: {"error": …}` event and no `[DONE]`.',
            headers: {
              ...rateLimitHeaders(),
              'x-request-id': header('x-request-id'),
              'Cache-Status': header('Cache-Status'),
              'x-chatwire-conversation-id': header('x-chatwire-conversation-id'),
            },
            content: {
              'application/json': { schema: ref('OpenAIChatCompletion'), example: completion },
              'text/event-stream': {
                schema: { type: 'string' },
                example: stream,
                'x-events': { chunk: ref('OpenAIChatChunk'), error: ref('OpenAIErrorBody') },
              },
            },
          },
          ...openAIErrorResponses(OPENAI_ROUTE_ERRORS.completions),
        },
      },
    },
  };
}

function readPackageVersion(root: string): string {
  return (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string }).version;
}

export function buildOpenApi(version: string): Json {
  const conditional = { ETag: { $ref: '#/components/headers/ETag' }, 'Cache-Control': { $ref: '#/components/headers/Cache-Control' } };
  const notModified = { '304': { description: 'Not Modified: the `If-None-Match` ETag still matches' } };
  const idParam = (name: string, description: string) => ({
    name,
    in: 'path',
    required: true,
    description,
    schema: { type: 'string', minLength: 1, maxLength: 128 },
  });
  const history = serverExamples['conversation.history'];
  const plain = (description: string, type: string, example?: string): Json => ({
    description,
    content: { [type]: example === undefined ? { schema: { type: 'string' } } : { schema: { type: 'string' }, example } },
  });
  return {
    openapi: '3.1.0',
    info: {
      title: 'chatwire HTTP API',
      version,
      summary: 'Realtime LLM chat: the HTTP side of the chatwire protocol.',
      description:
        "Generated from the zod schemas in src/protocol by scripts/gen-docs.ts; do not edit by hand. The WebSocket protocol (`GET /ws`, socket.io at `/socket.io/`) carries the same messages and is described in docs/protocol.md. Every `/v1` and `/api/chat` response carries the IETF draft `RateLimit-Policy` and `RateLimit` fields; a 429 carries `Retry-After` (seconds). The `/api/chat` routes speak the Vercel AI SDK's UI message stream (docs/ai-sdk.md).",
      license: { name: 'MIT', identifier: 'MIT' },
    },
    servers: [{ url: '/', description: 'the chatwire server itself (default port 8080)' }],
    security: [{ bearerAuth: [] }, { tokenQuery: [] }, { openModeUser: [] }, {}],
    tags: [
      { name: 'chat', description: 'send a chat, read its task, stream its deltas, read a conversation' },
      { name: 'ai-sdk', description: "the Vercel AI SDK's chat stream, what useChat's default transport speaks (docs/ai-sdk.md)" },
      { name: 'openai', description: 'the OpenAI chat completions API, for the official OpenAI clients (docs/openai.md)' },
      { name: 'marketplace', description: 'service requests and bookings' },
      { name: 'operations', description: 'health, readiness, metrics' },
      { name: 'browser', description: 'the chat page and the client library' },
    ],
    paths: {
      '/v1/chat': {
        post: {
          tags: ['chat'],
          operationId: 'sendChat',
          summary: 'Stores the message and acks at once (before the model runs); read the reply from the task stream',
          parameters: [IDEMPOTENCY_KEY_PARAM],
          requestBody: { required: true, content: { 'application/json': { schema: ref('ChatSendBody'), example: strip(clientExamples['chat.send']) } } },
          responses: {
            '202': jsonResponse(
              'Accepted: the chat.ack fields (with `id` when the body had one). A repeated `Idempotency-Key` (or `clientMessageId`) gets the first answer again, with `Idempotent-Replayed: true`',
              'ChatAck',
              strip(serverExamples['chat.ack']),
            ),
            ...errorResponses(ROUTE_ERRORS.chat),
          },
        },
      },
      '/v1/tasks/{taskId}': {
        get: {
          tags: ['chat'],
          operationId: 'getTask',
          summary: 'The task: status, deltas so far (`seq`) and text so far',
          parameters: [idParam('taskId', 'from the ack')],
          responses: {
            '200': jsonResponse('The task; a finished one is cacheable for 300 s', 'TaskInfo', serverExamples.task.task, conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.task),
          },
        },
      },
      '/v1/tasks/{taskId}/stream': {
        get: {
          tags: ['chat'],
          operationId: 'streamTask',
          summary: 'Server-Sent Events: `delta` (with `id:` = seq), then one `done` or `error`; `Last-Event-ID` resumes after that seq',
          parameters: [
            idParam('taskId', 'from the ack'),
            {
              name: 'Last-Event-ID',
              in: 'header',
              required: false,
              description: 'the seq of the last delta seen: the stream resumes after it',
              schema: { type: 'string', pattern: '^[0-9]+$' },
            },
            {
              name: 'lastEventId',
              in: 'query',
              required: false,
              description: 'the same, for clients that cannot set the header',
              schema: { type: 'string', pattern: '^[0-9]+$' },
            },
          ],
          responses: {
            '200': {
              description:
                'An event stream: `event: delta` / `id: <seq>` / `data: <chat.delta JSON>`, then `event: done` with a chat.done or `event: error` with a chat.error, and the stream ends. Comment lines (`: keep-alive`) keep proxies from timing out.',
              headers: rateLimitHeaders(),
              content: {
                'text/event-stream': {
                  schema: { type: 'string' },
                  example: `id: 0\nevent: delta\ndata: ${JSON.stringify(serverExamples['chat.delta'])}\n\nevent: done\ndata: ${JSON.stringify(serverExamples['chat.done'])}\n\n`,
                  'x-events': { delta: ref('ChatDelta'), done: ref('ChatDone'), error: ref('ChatError') },
                },
              },
            },
            ...errorResponses(ROUTE_ERRORS.stream),
          },
        },
      },
      '/v1/conversations': {
        get: {
          tags: ['chat'],
          operationId: 'listConversations',
          summary: "The caller's conversations, newest activity first, as `conversations.list`",
          parameters: queryParameters(ConversationsListFields, ['limit', 'cursor']),
          responses: {
            '200': jsonResponse('A page; `nextCursor` is null at the end', 'ConversationsPage', strip(serverExamples['conversations.list']), conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.conversations),
          },
        },
      },
      '/v1/conversations/{conversationId}/messages': {
        get: {
          tags: ['chat'],
          operationId: 'conversationMessages',
          summary: 'A page of the conversation, oldest first; `before` pages back',
          parameters: [idParam('conversationId', 'from the ack'), ...queryParameters(HistoryQueryFields, ['before', 'limit'])],
          responses: {
            '200': jsonResponse('The messages (oldest first) and whether older ones exist', 'HistoryPage', strip(history), conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.history),
          },
        },
      },
      ...openAIPaths(),
      '/v1/requests': {
        get: {
          tags: ['marketplace'],
          operationId: 'listRequests',
          summary: 'Service requests, newest first, with their consumer and quote count',
          parameters: queryParameters(RequestsListFields, ['status', 'category', 'limit', 'cursor']),
          responses: {
            '200': jsonResponse('A page; `nextCursor` is null at the end', 'RequestsPage', strip(serverExamples['requests.list']), conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.requests),
          },
        },
      },
      '/v1/consumers/{consumerId}/requests': {
        get: {
          tags: ['marketplace'],
          operationId: 'consumerRequests',
          summary: "A consumer's requests with their bookings (a consumer reads only its own; staff any)",
          parameters: [idParam('consumerId', 'the consumer'), ...queryParameters(ConsumerPageFields, ['limit', 'cursor'])],
          responses: {
            '200': jsonResponse('A page; `nextCursor` is null at the end', 'ConsumerRequestsPage', strip(serverExamples['consumer.requests']), conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.consumer),
          },
        },
      },
      '/v1/consumers/{consumerId}/bookings': {
        get: {
          tags: ['marketplace'],
          operationId: 'consumerBookings',
          summary: "A consumer's bookings, newest first, with request and provider",
          parameters: [idParam('consumerId', 'the consumer'), ...queryParameters(ConsumerPageFields, ['limit', 'cursor'])],
          responses: {
            '200': jsonResponse('A page; `nextCursor` is null at the end', 'ConsumerBookingsPage', strip(serverExamples['consumer.bookings']), conditional),
            ...notModified,
            ...errorResponses(ROUTE_ERRORS.consumer),
          },
        },
      },
      '/api/chat': {
        post: {
          tags: ['ai-sdk'],
          operationId: 'aiSdkChat',
          summary:
            "useChat's request: the chat id is the caller's conversation (made on first use); submit-message sends the last message's text, regenerate-message answers the last stored user message again; the answer is the task's UI message stream",
          parameters: [IDEMPOTENCY_KEY_PARAM],
          requestBody: { required: true, content: { 'application/json': { schema: ref('AiSdkChatBody'), example: AiSdkChatBodySchema.parse(aiSdkBody) } } },
          responses: { '200': uiMessageStreamResponse(), ...errorResponses(ROUTE_ERRORS.aiSdkChat) },
        },
      },
      '/api/chat/{chatId}/stream': {
        get: {
          tags: ['ai-sdk'],
          operationId: 'aiSdkResume',
          summary: "The chat's latest task while it streams, from its start and then live (useChat's resume); 204 when none streams",
          parameters: [idParam('chatId', "useChat's chat id")],
          responses: {
            '200': uiMessageStreamResponse(),
            '204': { description: 'No task of this chat is streaming', headers: rateLimitHeaders() },
            ...errorResponses(ROUTE_ERRORS.aiSdkChatId),
          },
        },
      },
      '/api/chat/{chatId}/stop': {
        post: {
          tags: ['ai-sdk'],
          operationId: 'aiSdkStop',
          summary: "Cancels the chat's streaming task: its stream ends with an `abort` part and the text so far is stored",
          parameters: [idParam('chatId', "useChat's chat id")],
          responses: {
            '204': { description: 'Cancelled, or nothing was streaming', headers: rateLimitHeaders() },
            ...errorResponses(ROUTE_ERRORS.aiSdkChatId),
          },
        },
      },
      '/healthz': {
        get: {
          tags: ['operations'],
          operationId: 'health',
          summary: 'Liveness: 200 while the process runs',
          security: [],
          responses: {
            '200': {
              description: 'alive',
              content: { 'application/json': { schema: { type: 'object', properties: { status: { const: 'ok' } } }, example: { status: 'ok' } } },
            },
          },
        },
      },
      '/readyz': {
        get: {
          tags: ['operations'],
          operationId: 'ready',
          summary: 'Readiness: 200 when SQLite, the LMDB cache and the worker pool answer, else 503 naming the failures',
          security: [],
          responses: {
            '200': { description: 'ready', content: { 'application/json': { example: { status: 'ready' } } } },
            '503': {
              description: 'not ready',
              content: { 'application/json': { example: { status: 'not ready', failures: { workers: 'the pool is closed' } } } },
            },
          },
        },
      },
      '/metrics': {
        get: {
          tags: ['operations'],
          operationId: 'metrics',
          summary: 'Prometheus metrics (text exposition format)',
          security: [],
          responses: { '200': plain('the metrics', 'text/plain; version=0.0.4; charset=utf-8') },
        },
      },
      '/': {
        get: {
          tags: ['browser'],
          operationId: 'chatPage',
          summary: 'The browser chat page',
          security: [],
          responses: { '200': plain('the page (ETag revalidated)', 'text/html; charset=utf-8'), ...notModified },
        },
      },
      '/client.js': {
        get: {
          tags: ['browser'],
          operationId: 'clientLibrary',
          summary: 'The client library as one ES module (no imports; CORS open), see docs/client.md',
          security: [],
          responses: { '200': plain('the module (ETag revalidated)', 'text/javascript; charset=utf-8'), ...notModified },
        },
      },
      '/openapi.json': {
        get: {
          tags: ['browser'],
          operationId: 'openApi',
          summary: 'This OpenAPI 3.1 description of the HTTP routes',
          security: [],
          responses: {
            '200': { description: 'OpenAPI 3.1 (ETag revalidated)', content: { 'application/json': { schema: { type: 'object' } } } },
            ...notModified,
          },
        },
      },
    },
    components: {
      schemas: componentSchemas(),
      responses: { ...responseComponents(), ...openAIResponseComponents() },
      headers: {
        RateLimit: {
          description:
            'IETF draft RateLimit field: per bucket (`messages`, `chats`, `tokens`) the units available now `r`, and `t`: the seconds within which no more than `r` can be used (until the next unit drips in; on a 429 from `messages` or `chats`, `Retry-After`; a chat needs `r` of `tokens` at least its maxTokens)',
          schema: { type: 'string' },
          example: '"messages";r=49;t=1, "chats";r=59;t=1, "tokens";r=20000;t=1',
        },
        'RateLimit-Policy': {
          description: 'IETF draft RateLimit-Policy field: per bucket the quota `q` and window `w` in seconds',
          schema: { type: 'string' },
          example: '"messages";q=50;w=1, "chats";q=60;w=60, "tokens";q=20000;w=60;chatwire-unit="model-tokens"',
        },
        'Retry-After': {
          description: 'seconds until the same call can succeed (retryAfterMs rounded up, at least 1)',
          schema: { type: 'integer', minimum: 1 },
        },
        'retry-after-ms': {
          description: 'OpenAI-compatible routes: milliseconds until the same call can succeed (the official clients wait this long before their retry)',
          schema: { type: 'integer', minimum: 1 },
        },
        'x-request-id': {
          description: 'the task id of the completion: `GET /v1/tasks/{taskId}` reads it, its stream route streams it',
          schema: { type: 'string' },
        },
        'Cache-Status': {
          description:
            'RFC 9211: `chatwire; hit` (a cached reply), `chatwire; fwd=miss` (a model call), `chatwire; fwd=miss; collapsed` (joined an identical call in flight)',
          schema: { type: 'string' },
        },
        'x-chatwire-conversation-id': { description: 'the conversation the exchange is stored in', schema: { type: 'string' } },
        ETag: { description: 'strong validator of the body; send it back as If-None-Match for a 304', schema: { type: 'string' } },
        'Cache-Control': {
          description: '`private, no-cache` for live reads, `private, max-age=300` for a finished task, `private, max-age=5, must-revalidate` for listings',
          schema: { type: 'string' },
        },
      },
      securitySchemes: {
        bearerAuth: {
          type: 'http',
          scheme: 'bearer',
          bearerFormat: 'JWT',
          description: 'HS256 JWT with `sub`, `role` (`consumer`, `provider`, `staff`), `exp`; required when CHATWIRE_JWT_SECRET is set',
        },
        tokenQuery: { type: 'apiKey', in: 'query', name: 'token', description: 'the same JWT as a query parameter' },
        openModeUser: { type: 'apiKey', in: 'query', name: 'user', description: 'open mode only (no CHATWIRE_JWT_SECRET): the trusted user id' },
      },
    },
  };
}

// ---------- docs/client.md: the size of the client library ----------

export interface ClientSize {
  /** Compiled (tsc, comments removed) bytes, and gzip -9 of that. */
  jsBytes: number;
  jsGzipBytes: number;
  /** The same with indentation and blank lines stripped, and gzip -9 of that. */
  strippedBytes: number;
  strippedGzipBytes: number;
}

/**
 * No minifier is installed, so "minified" is approximated by stripping
 * comments, indentation and blank lines (no renaming); gzip makes most of the
 * remaining difference small. Computed from the source, so it is the same
 * whatever build directory exists.
 */
export function clientSize(root: string): ClientSize {
  const source = fs.readFileSync(path.join(root, 'src', 'client', 'client.ts'), 'utf8');
  const js = ts.transpileModule(source, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ES2022, removeComments: true },
  }).outputText;
  const stripped = js
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '')
    .join('\n');
  const gz = (text: string) => gzipSync(Buffer.from(text), { level: 9 }).length;
  return { jsBytes: Buffer.byteLength(js), jsGzipBytes: gz(js), strippedBytes: Buffer.byteLength(stripped), strippedGzipBytes: gz(stripped) };
}

function sizeSection(size: ClientSize): string {
  const kb = (n: number) => `${(n / 1024).toFixed(1)} KiB`;
  return [
    '| build of src/client/client.ts | bytes | gzip -9 |',
    '|---|---|---|',
    `| compiled by tsc, comments removed | ${size.jsBytes} (${kb(size.jsBytes)}) | ${size.jsGzipBytes} (${kb(size.jsGzipBytes)}) |`,
    `| indentation and blank lines stripped too | ${size.strippedBytes} (${kb(size.strippedBytes)}) | **${size.strippedGzipBytes} (${kb(size.strippedGzipBytes)})** |`,
  ].join('\n');
}

// ---------- putting it together ----------

/** Replaces the body of every `<!-- generated:NAME -->…<!-- /generated:NAME -->` block; each named block must exist. */
export function fillSections(text: string, sections: Record<string, string>, file: string): string {
  let out = text;
  for (const [name, body] of Object.entries(sections)) {
    const open = `<!-- generated:${name} -->`;
    const close = `<!-- /generated:${name} -->`;
    const start = out.indexOf(open);
    const end = out.indexOf(close);
    if (start < 0 || end < start) throw new Error(`${file} has no ${open} … ${close} block`);
    out = `${out.slice(0, start + open.length)}\n${body}\n${out.slice(end)}`;
  }
  return out;
}

export type DocFiles = Record<'docs/protocol.md' | 'docs/openapi.json' | 'docs/client.md', string>;

/** What the generated files should contain, given the hand-written parts now on disk. Writes nothing. */
export function renderDocs(root: string): DocFiles {
  const api = buildOpenApi(readPackageVersion(root));
  const read = (file: string) => fs.readFileSync(path.join(root, file), 'utf8');
  return {
    'docs/protocol.md': fillSections(
      read('docs/protocol.md'),
      {
        'client-messages': clientMessagesSection(),
        'server-messages': serverMessagesSection(),
        errors: errorsSection(),
        'http-routes': httpSection(api),
        'ai-sdk': aiSdkSection(),
      },
      'docs/protocol.md',
    ),
    'docs/openapi.json': `${JSON.stringify(api, null, 2)}\n`,
    'docs/client.md': fillSections(read('docs/client.md'), { size: sizeSection(clientSize(root)) }, 'docs/client.md'),
  };
}

export function projectRoot(from = path.dirname(fileURLToPath(import.meta.url))): string {
  let dir = from;
  for (let i = 0; i < 6; i++) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error('project root not found');
}

function main(): void {
  const check = process.argv.includes('--check');
  const root = projectRoot();
  const files = renderDocs(root);
  const stale: string[] = [];
  for (const [file, content] of Object.entries(files)) {
    const target = path.join(root, file);
    const current = fs.existsSync(target) ? fs.readFileSync(target, 'utf8') : null;
    if (current === content) continue;
    stale.push(file);
    if (!check) fs.writeFileSync(target, content);
  }
  const size = clientSize(root);
  console.log(`client library: ${size.strippedGzipBytes} bytes gzipped (stripped), ${size.jsGzipBytes} bytes gzipped (as compiled)`);
  if (check) {
    if (stale.length > 0) {
      console.error(`stale: ${stale.join(', ')}; run npm run docs`);
      process.exit(1);
    }
    console.log('docs are up to date');
  } else {
    console.log(stale.length > 0 ? `wrote ${stale.join(', ')}` : 'docs were already up to date');
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) main();
