/**
 * The AI SDK's chat stream (PROTOCOL.md, "AI SDK chat stream"): what `useChat` with its default HTTP transport
 * (`DefaultChatTransport` of the `ai` package, versions 5 and 6) sends to `POST /api/chat`, and the UI message
 * stream chunks chatwire answers with. Only what chatwire reads is checked; the rest of a UIMessage (metadata,
 * part types other than text, fields a later version adds) is let through unread.
 */
import { z } from 'zod';
import { ChatSendFields } from './messages.js';
import type { FrameBounds } from './frame-shape.js';

/**
 * A chat id names one conversation of the user, and it is that conversation's id as it is: chat ids and conversation
 * ids obey the same rule (1..128 characters), so no mapping is needed, and the chat is the same conversation on
 * every route (`GET /v1/conversations/:id/messages`, `chat.send` with `conversationId`, the conversations list).
 */
export const AiSdkChatIdSchema = z.string().min(1).max(128);

export const AiSdkTriggerSchema = z.enum(['submit-message', 'regenerate-message']);

export const AiSdkTextPartSchema = z.looseObject({ type: z.literal('text'), text: z.string() });
/** Any other part (file, reasoning, tool, data, step-start, …): ignored. */
export const AiSdkOtherPartSchema = z.looseObject({ type: z.string().refine((t) => t !== 'text', 'a text part needs its text, a string') });
export const AiSdkMessagePartSchema = z.union([AiSdkTextPartSchema, AiSdkOtherPartSchema]);

export const AiSdkUIMessageSchema = z.looseObject({
  id: z.string(),
  role: z.enum(['system', 'user', 'assistant']),
  parts: z.array(AiSdkMessagePartSchema),
});

/** The text of a UIMessage: its text parts, joined by a line break. */
export function uiMessageText(message: z.infer<typeof AiSdkUIMessageSchema>): string {
  return message.parts
    .filter((p): p is z.infer<typeof AiSdkTextPartSchema> => p.type === 'text')
    .map((p) => p.text)
    .join('\n');
}

/** `POST /api/chat` body. Other top-level fields (what an app adds with the transport's `body` option) are ignored. */
export const AiSdkChatBodySchema = z
  .looseObject({
    id: AiSdkChatIdSchema,
    messages: z.array(AiSdkUIMessageSchema).min(1),
    trigger: AiSdkTriggerSchema.optional(),
    messageId: z.string().optional(),
  })
  .superRefine((body, ctx) => {
    // A regenerated reply answers the stored question: the messages are not read.
    if (body.trigger === 'regenerate-message') return;
    const at = body.messages.length - 1;
    const last = body.messages[at];
    if (last === undefined) return;
    if (last.role !== 'user') {
      ctx.addIssue({ code: 'custom', path: ['messages', at, 'role'], message: 'the last message of a submit-message is the user message to answer' });
      return;
    }
    const text = ChatSendFields.text.safeParse(uiMessageText(last));
    if (!text.success) {
      const issue = text.error.issues[0];
      ctx.addIssue({ code: 'custom', path: ['messages', at, 'parts'], message: `the text parts of the user message: ${issue?.message ?? 'invalid'}` });
    }
  });

/**
 * How much structure a body may have before it is decoded (see scanFrame). The other parts of the messages are let
 * through unread, so no schema bounds them: tool inputs and outputs nest (depth 32 leaves them 26 levels), and the
 * AI SDK sends the whole chat every time (100 000 values is a long chat with tools; a default 64 KiB body cannot
 * hold half of that). Past these a body costs the parse more than any chat needs.
 */
export const AI_SDK_BODY_BOUNDS: FrameBounds = Object.freeze({ depth: 32, values: 100_000 });

// ---------- the UI message stream: one `data: <chunk JSON>` event each, then `data: [DONE]` ----------

export const AiSdkStartChunkSchema = z.object({ type: z.literal('start'), messageId: z.string() });
export const AiSdkTextStartChunkSchema = z.object({ type: z.literal('text-start'), id: z.string() });
export const AiSdkTextDeltaChunkSchema = z.object({ type: z.literal('text-delta'), id: z.string(), delta: z.string() });
export const AiSdkTextEndChunkSchema = z.object({ type: z.literal('text-end'), id: z.string() });
export const AiSdkFinishChunkSchema = z.object({ type: z.literal('finish'), finishReason: z.enum(['stop', 'length']) });
export const AiSdkAbortChunkSchema = z.object({ type: z.literal('abort') });
export const AiSdkErrorChunkSchema = z.object({ type: z.literal('error'), errorText: z.string() });

export const AiSdkStreamChunkSchema = z.discriminatedUnion('type', [
  AiSdkStartChunkSchema,
  AiSdkTextStartChunkSchema,
  AiSdkTextDeltaChunkSchema,
  AiSdkTextEndChunkSchema,
  AiSdkFinishChunkSchema,
  AiSdkAbortChunkSchema,
  AiSdkErrorChunkSchema,
]);

export type AiSdkChatBody = z.infer<typeof AiSdkChatBodySchema>;
export type AiSdkUIMessage = z.infer<typeof AiSdkUIMessageSchema>;
export type AiSdkStreamChunk = z.infer<typeof AiSdkStreamChunkSchema>;
