import { AppError, badRequestFromZod } from './errors.js';
import { ClientMessageSchema, clientMessageTypes, type ClientMessage } from './messages.js';

export type ParseResult = { ok: true; message: ClientMessage } | { ok: false; error: AppError; id: string | undefined };

function echoableId(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const id = (value as Record<string, unknown>).id;
  return typeof id === 'string' && id.length > 0 && id.length <= 64 ? id : undefined;
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
  const parsed = ClientMessageSchema.safeParse(value);
  if (!parsed.success) return { ok: false, id, error: badRequestFromZod(parsed.error, type) };
  return { ok: true, message: parsed.data };
}
