import { z } from 'zod';
import { ClientMessageSchema } from './messages.js';

/**
 * How much structure a frame may have: `depth` levels of nested objects and arrays (a flat object is 1) and
 * `values` keys and array elements in all, at every level together.
 */
export interface FrameBounds {
  depth: number;
  values: number;
}

type JsonSchema = { type?: string; properties?: Record<string, JsonSchema>; items?: JsonSchema; maxItems?: number; oneOf?: JsonSchema[]; anyOf?: JsonSchema[] };

/** The most structure a value of `schema` (as JSON Schema) can have; throws for an unbounded array. */
function boundsOf(schema: JsonSchema): FrameBounds {
  const alternatives = schema.oneOf ?? schema.anyOf;
  if (alternatives) {
    return alternatives.map(boundsOf).reduce((a, b) => ({ depth: Math.max(a.depth, b.depth), values: Math.max(a.values, b.values) }), { depth: 0, values: 0 });
  }
  if (schema.type === 'object') {
    let depth = 1;
    let values = 0;
    for (const child of Object.values(schema.properties ?? {})) {
      const b = boundsOf(child);
      depth = Math.max(depth, 1 + b.depth);
      values += 1 + b.values;
    }
    return { depth, values };
  }
  if (schema.type === 'array') {
    if (schema.maxItems === undefined) throw new Error('a client message with an array of unbounded length has no bound to scan frames against');
    const b = boundsOf(schema.items ?? {});
    return { depth: 1 + b.depth, values: schema.maxItems * (1 + b.values) };
  }
  return { depth: 0, values: 0 };
}

/**
 * The largest structure any client message has, derived from the schemas: a frame with more nesting or more
 * values than this fails its schema whatever it holds, so it can be refused without decoding it.
 */
export const CLIENT_MESSAGE_BOUNDS: FrameBounds = Object.freeze(boundsOf(z.toJSONSchema(ClientMessageSchema) as JsonSchema));

export type FrameShape = { ok: true; id: string | undefined } | { ok: false; reason: string; id: string | undefined };

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COMMA = 0x2c;
const COLON = 0x3a;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;

/** The index of the quote that closes the string opened at `start` (or text.length when it is not closed). */
function stringEnd(text: string, start: number): number {
  let at = start + 1;
  for (;;) {
    const q = text.indexOf('"', at);
    if (q < 0) return text.length;
    let slashes = 0;
    while (text.charCodeAt(q - 1 - slashes) === BACKSLASH) slashes++;
    if (slashes % 2 === 0) return q;
    at = q + 1;
  }
}

/** A string token as the `id` a reply echoes (the schema's rule: 1..64 chars); undefined otherwise. */
function idOf(token: string): string | undefined {
  // A longer token cannot decode to 64 chars or fewer (an escape is at most 6 chars for 1).
  if (token.length > 2 + 6 * 64) return undefined;
  let id: unknown;
  try {
    id = JSON.parse(token);
  } catch {
    return undefined;
  }
  return typeof id === 'string' && id.length > 0 && id.length <= 64 ? id : undefined;
}

/**
 * A linear scan of a frame's text, before any JSON.parse, that refuses a frame nesting deeper or holding more
 * values than `bounds`: what JSON.parse and the schema would spend on it grows with its structure (a 64 KiB
 * frame of 32,000 nested arrays costs over a hundred times a flat one), and this costs one pass that stops at
 * the first value past the bound. It does not validate JSON (JSON.parse does that after it, on a frame now
 * known to be small in structure). It also reads the first `"id"` key of an object at depth `idDepth` (1: the
 * frame is the message; 2: the message is an element of the frame, as in a socket.io event), so that a frame
 * refused before it is decoded can still be answered with its id.
 */
export function scanFrame(text: string, bounds: FrameBounds, idDepth = 1): FrameShape {
  let depth = 0;
  let values = 0;
  let id: string | undefined;
  // Whether each open container is an object, and whether the next string in it is a key.
  const isObject: boolean[] = [];
  let expectKey = false;
  let lastKeyIsId = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) {
      const end = stringEnd(text, i);
      if (expectKey) {
        lastKeyIsId = depth === idDepth && id === undefined && end - i === 3 && text.charCodeAt(i + 1) === 0x69 && text.charCodeAt(i + 2) === 0x64;
        expectKey = false;
      } else if (lastKeyIsId) {
        id = idOf(text.slice(i, end + 1));
        lastKeyIsId = false;
      }
      i = end;
    } else if (c === OPEN_OBJECT || c === OPEN_ARRAY) {
      lastKeyIsId = false;
      depth++;
      if (depth > bounds.depth) return { ok: false, id, reason: `frame nests deeper than any message (at most ${bounds.depth} levels)` };
      isObject[depth - 1] = c === OPEN_OBJECT;
      expectKey = c === OPEN_OBJECT;
      // An array's first element is counted here unless the array is empty.
      if (c === OPEN_ARRAY) {
        let j = i + 1;
        while (j < text.length && text.charCodeAt(j) <= 0x20) j++;
        if (text.charCodeAt(j) !== CLOSE_ARRAY) values++;
      }
    } else if (c === CLOSE_OBJECT || c === CLOSE_ARRAY) {
      depth--;
      expectKey = false;
      lastKeyIsId = false;
    } else if (c === COMMA) {
      // A comma starts the next key of an object or the next element of an array.
      if (depth > 0 && isObject[depth - 1] === true) expectKey = true;
      else if (depth > 0) values++;
      lastKeyIsId = false;
    } else if (c === COLON) {
      values++;
    } else {
      continue;
    }
    if (values > bounds.values) return { ok: false, id, reason: `frame holds more values than any message (at most ${bounds.values})` };
  }
  return { ok: true, id };
}
