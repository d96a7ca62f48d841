import fs from 'node:fs';

/**
 * A minimal GGUF (v3) writer: typed metadata and F32 tensors, laid out the way
 * ggml's reader expects (tensor data contiguous, each tensor padded to the
 * alignment, the data section starting on an aligned offset). Enough to write
 * a model that llama.cpp loads; see gguf-tiny-llama.ts for the one we make.
 */

const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
const GGUF_VERSION = 3;
const DEFAULT_ALIGNMENT = 32;
const GGML_TYPE_F32 = 0;

// gguf_type in ggml/include/gguf.h
const valueTypeIds = {
  uint8: 0,
  int8: 1,
  uint16: 2,
  int16: 3,
  uint32: 4,
  int32: 5,
  float32: 6,
  bool: 7,
  string: 8,
  array: 9,
  uint64: 10,
  int64: 11,
  float64: 12,
} as const;

export type GgufValue =
  | { type: 'uint32' | 'int32' | 'float32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'uint64'; value: bigint }
  | { type: 'array'; itemType: 'uint32' | 'int32' | 'float32'; value: readonly number[] }
  | { type: 'array'; itemType: 'string'; value: readonly string[] };

export interface GgufTensor {
  name: string;
  /** ggml order: dims[0] is the fastest-varying (row length). */
  dims: readonly number[];
  /** F32 values, dims' product of them; produced when the tensor is written, so big models never sit in memory whole. */
  data: () => Float32Array;
}

export interface GgufWriteOptions {
  alignment?: number;
}

/** Collects bytes in growable chunks; used for the header, whose size is not known up front. */
class ByteSink {
  private chunks: Buffer[] = [];
  length = 0;

  push(buf: Buffer): void {
    this.chunks.push(buf);
    this.length += buf.length;
  }
  u32(v: number): void {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32LE(v >>> 0);
    this.push(b);
  }
  i32(v: number): void {
    const b = Buffer.allocUnsafe(4);
    b.writeInt32LE(v | 0);
    this.push(b);
  }
  f32(v: number): void {
    const b = Buffer.allocUnsafe(4);
    b.writeFloatLE(v);
    this.push(b);
  }
  u64(v: bigint | number): void {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  bool(v: boolean): void {
    this.push(Buffer.from([v ? 1 : 0]));
  }
  str(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.push(bytes);
  }
  toBuffer(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

function writeScalar(sink: ByteSink, type: 'uint32' | 'int32' | 'float32' | 'string', value: number | string): void {
  switch (type) {
    case 'uint32':
      sink.u32(value as number);
      break;
    case 'int32':
      sink.i32(value as number);
      break;
    case 'float32':
      sink.f32(value as number);
      break;
    case 'string':
      sink.str(value as string);
      break;
  }
}

function writeValue(sink: ByteSink, v: GgufValue): void {
  sink.u32(valueTypeIds[v.type]);
  switch (v.type) {
    case 'uint32':
    case 'int32':
    case 'float32':
      writeScalar(sink, v.type, v.value);
      break;
    case 'bool':
      sink.bool(v.value);
      break;
    case 'string':
      sink.str(v.value);
      break;
    case 'uint64':
      sink.u64(v.value);
      break;
    case 'array':
      sink.u32(valueTypeIds[v.itemType]);
      sink.u64(v.value.length);
      for (const item of v.value) writeScalar(sink, v.itemType, item);
      break;
  }
}

const pad = (n: number, alignment: number) => (alignment - (n % alignment)) % alignment;

/** Writes a GGUF v3 file with the given metadata (in order) and F32 tensors. */
export function writeGgufFile(
  path: string,
  metadata: ReadonlyArray<readonly [string, GgufValue]>,
  tensors: readonly GgufTensor[],
  options: GgufWriteOptions = {},
): { bytes: number } {
  const alignment = options.alignment ?? DEFAULT_ALIGNMENT;
  const kv: Array<readonly [string, GgufValue]> = [...metadata];
  if (alignment !== DEFAULT_ALIGNMENT) kv.push(['general.alignment', { type: 'uint32', value: alignment }]);

  const header = new ByteSink();
  header.u32(GGUF_MAGIC);
  header.u32(GGUF_VERSION);
  header.u64(tensors.length);
  header.u64(kv.length);
  for (const [key, value] of kv) {
    header.str(key);
    writeValue(header, value);
  }
  let offset = 0;
  const sizes: number[] = [];
  for (const t of tensors) {
    if (t.dims.length === 0 || t.dims.length > 4 || t.dims.some((d) => !Number.isInteger(d) || d <= 0)) {
      throw new Error(`tensor ${t.name}: invalid dims ${JSON.stringify(t.dims)}`);
    }
    header.str(t.name);
    header.u32(t.dims.length);
    for (const d of t.dims) header.u64(d);
    header.u32(GGML_TYPE_F32);
    header.u64(offset);
    const bytes = t.dims.reduce((a, b) => a * b, 1) * 4;
    sizes.push(bytes);
    offset += bytes + pad(bytes, alignment);
  }
  header.push(Buffer.alloc(pad(header.length, alignment)));

  const fd = fs.openSync(path, 'w');
  let written = 0;
  try {
    const head = header.toBuffer();
    fs.writeSync(fd, head);
    written += head.length;
    tensors.forEach((t, i) => {
      const data = t.data();
      const expected = (sizes[i] as number) / 4;
      if (data.length !== expected) throw new Error(`tensor ${t.name}: ${data.length} values, dims need ${expected}`);
      const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      fs.writeSync(fd, buf);
      const padding = pad(buf.length, alignment);
      if (padding > 0) fs.writeSync(fd, Buffer.alloc(padding));
      written += buf.length + padding;
    });
  } finally {
    fs.closeSync(fd);
  }
  return { bytes: written };
}
