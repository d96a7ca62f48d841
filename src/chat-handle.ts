/**
 * `chatwire.chat`: the chat service for the host's server-side code, as a stable surface of its own (the service's
 * internals, Task and Sink, stay inside). A chat sent here is a chat of that user like any other: the same
 * validation, limits, storage and cache, and its deltas reach the user's connections that subscribe to it.
 */
import type { Logger } from 'pino';
import { z } from 'zod';
import type { Identity } from './auth/identity.js';
import { OpenUserIdSchema } from './auth/claims.js';
import type { ChatService } from './chat/chat-service.js';
import {
  AppError,
  badRequestFromZod,
  ChatSendBodySchema,
  RoleSchema,
  type ChatAck,
  type ChatDelta,
  type ChatDone,
  type ChatError,
  type ChatSendBody,
  type TaskInfo,
} from './protocol/index.js';

/** The user a server-side call acts for (`role` defaults to `consumer`). */
export interface ChatIdentity {
  userId: string;
  role?: Identity['role'];
}

/** What chat.send takes: the fields of a `chat.send` frame (text, conversationId, model, params, cache, clientMessageId). */
export type ChatRequest = Omit<ChatSendBody, 'id'>;
export type ChatAckInfo = Omit<ChatAck, 'type' | 'id'>;
/** What a subscriber gets: the task's deltas in seq order, then exactly one chat.done or chat.error. */
export type TaskMessage = ChatDelta | ChatDone | ChatError;

export interface ChatHandle {
  /** Sends a chat as `identity`; resolves with the ack (taskId, conversationId, ...) or rejects with a ChatwireError-coded AppError. */
  send(identity: ChatIdentity, body: ChatRequest): Promise<ChatAckInfo>;
  /** Streams a task's messages from `fromSeq` (default 0) to `onMessage`; resolves with the function that stops it. */
  subscribe(identity: ChatIdentity, taskId: string, onMessage: (message: TaskMessage) => void, options?: { fromSeq?: number }): Promise<() => void>;
  /** Cancels a running task of `identity`'s: its subscribers get chat.done with finishReason `cancelled`. */
  cancel(identity: ChatIdentity, taskId: string): Promise<void>;
  /** The task's status and usage. */
  task(identity: ChatIdentity, taskId: string): Promise<TaskInfo>;
}

const IdentitySchema = z.object({ userId: OpenUserIdSchema, role: RoleSchema.optional() });
const BodySchema = ChatSendBodySchema.omit({ id: true });

function identityOf(identity: ChatIdentity): Identity {
  const parsed = IdentitySchema.safeParse(identity);
  if (!parsed.success) throw badRequestFromZod(parsed.error, 'identity');
  return { userId: parsed.data.userId, role: parsed.data.role ?? 'consumer' };
}

export function createChatHandle(chat: ChatService, log: Logger): ChatHandle {
  return {
    async send(identity, body) {
      const caller = identityOf(identity);
      const parsed = BodySchema.safeParse(body);
      if (!parsed.success) throw badRequestFromZod(parsed.error, 'chat');
      return (await chat.send(caller, parsed.data)).ack;
    },
    async subscribe(identity, taskId, onMessage, options = {}) {
      const fromSeq = options.fromSeq ?? 0;
      if (!Number.isSafeInteger(fromSeq) || fromSeq < 0) throw new AppError('bad_request', 'fromSeq must be an integer >= 0');
      const subscription = await chat.subscribe(identityOf(identity), taskId, fromSeq, {
        // A server-side listener is never congested: it gets every delta as it is produced.
        congested: () => false,
        deliver: (message) => {
          try {
            onMessage(message as TaskMessage);
          } catch (err) {
            log.error({ err, taskId }, 'a chat.subscribe listener threw');
          }
          return true;
        },
      });
      subscription.pump();
      return () => subscription.close();
    },
    async cancel(identity, taskId) {
      await chat.cancel(identityOf(identity), taskId);
    },
    async task(identity, taskId) {
      return chat.task(identityOf(identity), taskId);
    },
  };
}
