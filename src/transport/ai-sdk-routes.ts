/**
 * The AI SDK's chat stream (PROTOCOL.md, "AI SDK chat stream"), so that `useChat` with its default HTTP transport
 * talks to chatwire with no client code of ours. A transport like the others: each request is a chat of the same
 * chat service (limits, cache, single-flight, storage), and its answer is the task's stream, written by the same
 * TaskEventStream as `GET /v1/tasks/:taskId/stream` in the AI SDK's UI message stream format.
 *
 * - `POST /api/chat`: the chat id is the conversation id (see AiSdkChatIdSchema); `submit-message` sends the last
 *   message's text, `regenerate-message` answers the conversation's last user message again. The answer streams
 *   the task; a client that goes away stops reading it, it does not cancel it (the AI SDK reconnects with GET
 *   …/stream; cancelling is `/stop`).
 * - `GET /api/chat/:chatId/stream`: the chat's latest task while it streams, from its start; 204 when none.
 * - `POST /api/chat/:chatId/stop`: cancels that task; 204.
 */
import type { HttpResponse } from 'uWebSockets.js';
import type { Identity } from '../auth/identity.js';
import {
  AI_SDK_BODY_BOUNDS,
  AiSdkChatBodySchema,
  AiSdkChatIdSchema,
  AppError,
  badRequestFromZod,
  uiMessageText,
  type AiSdkChatBody,
  type AiSdkStreamChunk,
} from '../protocol/index.js';
import { takeUserSlot } from './connection.js';
import { captureRequest, parseJsonBody, readBody, Responder, type RequestInfo } from './http-io.js';
import type { Routes } from './http-routes.js';
import { idempotencyKey, REPLAYED_HEADER } from './idempotency-key.js';
import { chargeEgress } from './session.js';
import { TaskEventStream, type SseEncoding } from './task-event-stream.js';

/** The one text part of a reply. */
const TEXT_ID = 'text-0';
const DONE = 'data: [DONE]\n\n';

function chunk(c: AiSdkStreamChunk): string {
  return `data: ${JSON.stringify(c)}\n\n`;
}

/**
 * A task as a UI message stream. Its message id is the task id: a resume replays the stream from its start, and the
 * AI SDK puts a replayed message whose id it already has in the place of the one the broken connection left cut
 * off, instead of adding a second one. A failure ends with `[DONE]` too, as the AI SDK's own servers end theirs.
 */
function uiMessageStream(taskId: string): SseEncoding {
  return {
    opening: chunk({ type: 'start', messageId: taskId }) + chunk({ type: 'text-start', id: TEXT_ID }),
    events(m) {
      if (m.type === 'chat.delta') return chunk({ type: 'text-delta', id: TEXT_ID, delta: m.text });
      if (m.type === 'chat.error') return chunk({ type: 'error', errorText: `${m.code}: ${m.message}` }) + DONE;
      const end = m.finishReason === 'cancelled' ? chunk({ type: 'abort' }) : chunk({ type: 'finish', finishReason: m.finishReason });
      return chunk({ type: 'text-end', id: TEXT_ID }) + end + DONE;
    },
  };
}

type Handler = (caller: Identity, info: RequestInfo, res: HttpResponse, responder: Responder, body: Promise<Buffer>) => Promise<void>;

/** A route under /api/chat: identity and the request bucket as on every HTTP route, errors in chatwire's body. */
function aiSdkRoute(routes: Routes, method: 'get' | 'post', pattern: string, params: number, readsBody: boolean, handler: Handler): void {
  const { deps } = routes;
  routes.app[method](pattern, (res, req) => {
    const responder = new Responder(res);
    const info = captureRequest(req, res, params);
    // Read now: uWS hands the body only to an onData registered before this callback returns (see v1Route).
    const body = readsBody ? readBody(responder, deps.config.maxFrameBytes) : Promise.resolve(Buffer.alloc(0));
    body.catch(() => {});
    void (async () => {
      let limitHeaders = routes.unidentifiedLimitHeaders;
      try {
        const caller = await routes.admit(info, (h) => (limitHeaders = h));
        await handler(caller, info, res, responder, body);
      } catch (err) {
        routes.sendError(responder, info, err, limitHeaders);
      }
    })();
  });
}

function chatIdParam(info: RequestInfo): string {
  const parsed = AiSdkChatIdSchema.safeParse(info.params[0]);
  if (!parsed.success) throw badRequestFromZod(parsed.error, 'chat id');
  return parsed.data;
}

async function chatBody(info: RequestInfo, body: Promise<Buffer>): Promise<AiSdkChatBody> {
  const contentType = info.headers.get('content-type') ?? '';
  if (contentType && !/^application\/json\b/i.test(contentType)) throw new AppError('bad_request', 'the body must be application/json');
  const parsed = AiSdkChatBodySchema.safeParse(parseJsonBody(await body, AI_SDK_BODY_BOUNDS));
  if (!parsed.success) throw badRequestFromZod(parsed.error, 'chat request');
  return parsed.data;
}

function headers(routes: Routes, info: RequestInfo, caller: Identity): Record<string, string> {
  const h: Record<string, string> = { ...routes.commonHeaders(info), ...routes.deps.rateLimitHeaders(caller.userId), 'cache-control': 'no-store' };
  const exposed = h['access-control-expose-headers'];
  if (exposed !== undefined) h['access-control-expose-headers'] = `${exposed}, x-chatwire-task-id, x-vercel-ai-ui-message-stream`;
  return h;
}

/** Streams the task from its start; the stream holds `releaseSlot` (one of the user's connection slots) until it ends. */
async function streamTask(
  routes: Routes,
  info: RequestInfo,
  res: HttpResponse,
  responder: Responder,
  caller: Identity,
  taskId: string,
  releaseSlot: () => void,
  replayed = false,
) {
  const { deps } = routes;
  const stream = new TaskEventStream(res, responder, routes.streams, releaseSlot, uiMessageStream(taskId));
  await stream.subscribe(deps.chat, caller, taskId, 0, (bytes) => chargeEgress(deps.session, caller.userId, bytes));
  stream.start({
    ...headers(routes, info, caller),
    'content-type': 'text/event-stream',
    'x-accel-buffering': 'no',
    'x-vercel-ai-ui-message-stream': 'v1',
    'x-chatwire-task-id': taskId,
    ...(replayed ? { [REPLAYED_HEADER]: 'true' } : {}),
  });
}

export function attachAiSdkRoutes(routes: Routes): void {
  const { deps } = routes;

  aiSdkRoute(routes, 'post', '/api/chat', 0, true, async (caller, info, res, responder, body) => {
    const { id: chatId, messages, trigger } = await chatBody(info, body);
    const clientMessageId = idempotencyKey(info);
    // Taken before the chat is sent: a user at its connection cap is refused before anything is stored or run.
    const releaseSlot = await takeUserSlot(deps, caller.userId);
    let taskId: string;
    let replayed = false;
    try {
      const regenerate = trigger === 'regenerate-message';
      const text = regenerate ? '' : uiMessageText(messages[messages.length - 1] as AiSdkChatBody['messages'][number]);
      const message = { text, conversationId: chatId, ...(clientMessageId === undefined ? {} : { clientMessageId }) };
      const sent = await deps.chat.send(caller, message, undefined, regenerate ? { regenerate } : { createConversation: true });
      taskId = sent.ack.taskId;
      // A repeated Idempotency-Key: the first request's task, streamed from its start.
      replayed = sent.duplicate;
    } catch (err) {
      releaseSlot();
      throw err;
    }
    await streamTask(routes, info, res, responder, caller, taskId, releaseSlot, replayed);
  });

  aiSdkRoute(routes, 'get', '/api/chat/:chatId/stream', 1, false, async (caller, info, res, responder) => {
    const taskId = await deps.chat.streamingTask(caller, chatIdParam(info));
    if (taskId === null) {
      responder.send(204, headers(routes, info, caller));
      return;
    }
    await streamTask(routes, info, res, responder, caller, taskId, await takeUserSlot(deps, caller.userId));
  });

  aiSdkRoute(routes, 'post', '/api/chat/:chatId/stop', 1, false, async (caller, info, _res, responder) => {
    const taskId = await deps.chat.streamingTask(caller, chatIdParam(info));
    if (taskId !== null) await deps.chat.cancel(caller, taskId);
    responder.send(204, headers(routes, info, caller));
  });
}
