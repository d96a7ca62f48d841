import { z } from 'zod';
import { AppError, capText, type ErrorCode, errorCatalogue } from './errors.js';
import { ChatSendFields } from './messages.js';

/**
 * The OpenAI chat completions API as chatwire speaks it (PROTOCOL.md, "OpenAI-compatible API"). Fields of the
 * official API that chatwire cannot honour are refused by name (400); any other field is ignored. JSON null counts
 * as leaving a field out, as in OpenAI's API.
 */

const unsupported = () => z.null({ error: 'not supported: chatwire answers with text only' }).optional();

export const OpenAITextPartSchema = z.object({
  type: z.literal('text', { error: 'only {"type": "text", "text"} content parts are supported' }),
  text: z.string(),
});

export const OpenAIMessageSchema = z.object({
  role: z.enum(['system', 'developer', 'user', 'assistant']),
  content: z.union([z.string(), z.array(OpenAITextPartSchema)]),
});

const MaxTokens = z.number().int().min(1).max(4096).nullish();

export const OpenAIChatRequestSchema = z
  .object({
    model: z.string().min(1).max(128),
    messages: z.array(OpenAIMessageSchema).min(1).max(200),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
    max_tokens: MaxTokens,
    max_completion_tokens: MaxTokens,
    temperature: z.number().min(0).max(2).nullish(),
    user: z.string().nullish(),
    n: z.literal(1, { error: 'only n = 1 is supported' }).nullish(),
    tools: unsupported(),
    tool_choice: unsupported(),
    functions: unsupported(),
    audio: unsupported(),
    response_format: z.object({ type: z.literal('text', { error: 'only response_format {"type": "text"} is supported' }) }).nullish(),
  })
  .superRefine((body, ctx) => {
    if (body.max_tokens != null && body.max_completion_tokens != null && body.max_tokens !== body.max_completion_tokens) {
      ctx.addIssue({ code: 'custom', path: ['max_tokens'], message: 'max_tokens and max_completion_tokens differ; send one of them' });
    }
    const last = body.messages.length - 1;
    const message = body.messages[last];
    if (message === undefined) return;
    if (message.role !== 'user') {
      ctx.addIssue({ code: 'custom', path: ['messages', last, 'role'], message: 'the last message must be the user message to answer' });
      return;
    }
    const text = ChatSendFields.text.safeParse(messageText(message));
    if (!text.success) ctx.addIssue({ code: 'custom', path: ['messages', last, 'content'], message: `the user message: ${text.error.issues[0]?.message}` });
  });

export type OpenAIMessage = z.infer<typeof OpenAIMessageSchema>;
export type OpenAIChatRequest = z.infer<typeof OpenAIChatRequestSchema>;

/** A message's text: its string, or its text parts one after another, a newline between two. */
export function messageText(message: OpenAIMessage): string {
  return typeof message.content === 'string' ? message.content : message.content.map((p) => p.text).join('\n');
}

// ---------- responses ----------

const Usage = z.object({ prompt_tokens: z.number().int().min(0), completion_tokens: z.number().int().min(0), total_tokens: z.number().int().min(0) });
const FinishReason = z.enum(['stop', 'length']);

export const OpenAIModelSchema = z.object({ id: z.string(), object: z.literal('model'), created: z.number().int(), owned_by: z.literal('chatwire') });
export const OpenAIModelListSchema = z.object({ object: z.literal('list'), data: z.array(OpenAIModelSchema) });

export const OpenAIChatCompletionSchema = z.object({
  id: z.string(),
  object: z.literal('chat.completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(z.object({ index: z.literal(0), message: z.object({ role: z.literal('assistant'), content: z.string() }), finish_reason: FinishReason })),
  usage: Usage,
});

export const OpenAIChatChunkSchema = z.object({
  id: z.string(),
  object: z.literal('chat.completion.chunk'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(
    z.object({
      index: z.literal(0),
      delta: z.object({ role: z.literal('assistant').optional(), content: z.string().optional() }),
      finish_reason: FinishReason.nullable(),
    }),
  ),
  usage: Usage.nullable().optional(),
});

export const OpenAIErrorTypeSchema = z.enum(['invalid_request_error', 'authentication_error', 'permission_error', 'rate_limit_error', 'server_error']);

/** The OpenAI error body: `code` is chatwire's code (or `model_not_found`), `param` the failing field or null. */
export const OpenAIErrorBodySchema = z.object({
  error: z.object({ message: z.string(), type: OpenAIErrorTypeSchema, param: z.string().nullable(), code: z.string() }),
});

export type OpenAIModelList = z.infer<typeof OpenAIModelListSchema>;
export type OpenAIChatCompletion = z.infer<typeof OpenAIChatCompletionSchema>;
export type OpenAIChatChunk = z.infer<typeof OpenAIChatChunkSchema>;
export type OpenAIErrorType = z.infer<typeof OpenAIErrorTypeSchema>;
export type OpenAIErrorBody = z.infer<typeof OpenAIErrorBodySchema>;

// ---------- errors ----------

/** The OpenAI error `type` of an HTTP status. */
export function openAIErrorType(status: number): OpenAIErrorType {
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

/** What an OpenAI error body says beyond the AppError: the failing field, and a code of the OpenAI API's own. */
export interface OpenAIErrorExtras {
  param?: string;
  code?: 'model_not_found';
}

/** An AppError whose OpenAI body names a field, or carries `model_not_found` as its code. */
export class OpenAIAppError extends AppError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly extras: OpenAIErrorExtras,
  ) {
    super(code, message);
  }
}

/** The OpenAI error body of an AppError. */
export function openAIErrorBody(err: AppError): OpenAIErrorBody {
  const extras = err instanceof OpenAIAppError ? err.extras : {};
  return {
    error: {
      message: err.message,
      type: openAIErrorType(errorCatalogue[err.code].status),
      param: extras.param ?? null,
      code: extras.code ?? err.code,
    },
  };
}

type Issue = z.ZodError['issues'][number];

/**
 * The issue that says what is wrong most precisely: a union (a message's `content`, string or parts) that failed
 * every way is explained by the branch that got furthest into the value, so a bad part is named by its own path.
 */
function preciseIssue(issue: Issue): { path: PropertyKey[]; message: string } {
  if (issue.code !== 'invalid_union') return issue;
  const deepest = issue.errors
    .map((branch) => branch[0])
    .filter((first): first is Issue => first !== undefined && first.path.length > 0)
    .sort((a, b) => b.path.length - a.path.length)[0];
  if (deepest === undefined) return { path: issue.path, message: 'expected a string or an array of {"type": "text", "text"} parts' };
  const inner = preciseIssue(deepest);
  return { path: [...issue.path, ...inner.path], message: inner.message };
}

/** A 400 for a body that fails the schema: `param` is the first failing field (`messages.2.content.0.type`). */
export function openAIBadRequest(error: z.ZodError): OpenAIAppError {
  const issues = error.issues.map(preciseIssue);
  const first = issues[0];
  const param = first === undefined || first.path.length === 0 ? undefined : capText(first.path.map(String).join('.'));
  const message = first === undefined ? 'invalid body' : `${param ?? 'body'}: ${capText(first.message)}`;
  return new OpenAIAppError('bad_request', message, param === undefined ? {} : { param });
}
