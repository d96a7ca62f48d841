import fs from 'node:fs';

/**
 * Reads the header of a GGUF file (metadata and tensor table) with every
 * length checked against the file size, so a damaged or foreign file fails
 * with a reason instead of a hang or a native crash. It reads only the
 * header: a multi-GB model is validated in milliseconds. Used to validate
 * CHATWIRE_MODEL_PATH at start (local.ts) and by the writer's tests.
 */

export type GgufMetadataScalar = number | bigint | boolean | string;
/** Arrays are summarised (type and length; values only for arrays of up to 64 numbers or strings). */
export interface GgufArraySummary {
  array: string;
  length: number;
  values?: GgufMetadataScalar[];
}

export interface GgufTensorInfo {
  name: string;
  dims: number[];
  /** ggml type id (0 = F32, 1 = F16, 8 = Q8_0, ...). */
  type: number;
  /** Offset from the start of the data section. */
  offset: number;
}

export interface GgufHeader {
  version: number;
  metadata: Map<string, GgufMetadataScalar | GgufArraySummary>;
  tensors: GgufTensorInfo[];
  /** Absolute offset of the tensor data section. */
  dataOffset: number;
  /** Bytes the tensor data needs (start of data to the end of the last tensor whose type is known). */
  dataBytes: number;
  fileBytes: number;
}

export class GgufFormatError extends Error {
  override name = 'GgufFormatError';
}

// [block size, bytes per block] from ggml's type_traits, by ggml type id.
const ggmlTypeSizes: Record<number, readonly [number, number]> = {
  0: [1, 4],
  1: [1, 2],
  2: [32, 18],
  3: [32, 20],
  6: [32, 22],
  7: [32, 24],
  8: [32, 34],
  9: [32, 36],
  10: [256, 84],
  11: [256, 110],
  12: [256, 144],
  13: [256, 176],
  14: [256, 210],
  15: [256, 292],
  16: [256, 66],
  17: [256, 74],
  18: [256, 98],
  19: [256, 50],
  20: [32, 18],
  21: [256, 110],
  22: [256, 82],
  23: [256, 136],
  24: [1, 1],
  25: [1, 2],
  26: [1, 4],
  27: [1, 8],
  28: [1, 8],
  29: [256, 56],
  30: [1, 2],
  34: [256, 54],
  35: [256, 66],
  39: [32, 17],
};

const MAX_COUNT = 100_000_000;

/** A sync reader over a file that loads it in chunks on demand and refuses to read past its end. */
class Cursor {
  private buf = Buffer.alloc(0);
  private bufStart = 0;
  pos = 0;

  constructor(
    private readonly fd: number,
    readonly size: number,
  ) {}

  private need(n: number, what: string): Buffer {
    if (this.pos + n > this.size) throw new GgufFormatError(`${what} runs past the end of the file (${this.size} bytes)`);
    if (this.pos < this.bufStart || this.pos + n > this.bufStart + this.buf.length) {
      const length = Math.min(this.size - this.pos, Math.max(n, 1 << 20));
      const next = Buffer.allocUnsafe(length);
      const read = fs.readSync(this.fd, next, 0, length, this.pos);
      if (read < n) throw new GgufFormatError(`${what} could not be read`);
      this.buf = next.subarray(0, read);
      this.bufStart = this.pos;
    }
    const at = this.pos - this.bufStart;
    this.pos += n;
    return this.buf.subarray(at, at + n);
  }
  u8(what: string): number {
    return this.need(1, what).readUInt8(0);
  }
  u32(what: string): number {
    return this.need(4, what).readUInt32LE(0);
  }
  u64(what: string): bigint {
    return this.need(8, what).readBigUInt64LE(0);
  }
  /** A u64 count or length that must also fit the bytes left in the file. */
  count(what: string, minBytesEach: number): number {
    const v = this.u64(what);
    if (v > BigInt(MAX_COUNT) || Number(v) * minBytesEach > this.size - this.pos) {
      throw new GgufFormatError(`${what} (${v}) does not fit in the file`);
    }
    return Number(v);
  }
  str(what: string): string {
    const n = this.count(`${what} length`, 1);
    return this.need(n, what).toString('utf8');
  }
  skip(n: number, what: string): void {
    if (this.pos + n > this.size) throw new GgufFormatError(`${what} runs past the end of the file (${this.size} bytes)`);
    this.pos += n;
  }
  scalar(type: number, what: string): GgufMetadataScalar {
    switch (type) {
      case 0:
        return this.u8(what);
      case 1:
        return this.need(1, what).readInt8(0);
      case 2:
        return this.need(2, what).readUInt16LE(0);
      case 3:
        return this.need(2, what).readInt16LE(0);
      case 4:
        return this.u32(what);
      case 5:
        return this.need(4, what).readInt32LE(0);
      case 6:
        return this.need(4, what).readFloatLE(0);
      case 7:
        return this.u8(what) !== 0;
      case 8:
        return this.str(what);
      case 10:
        return this.u64(what);
      case 11:
        return this.need(8, what).readBigInt64LE(0);
      case 12:
        return this.need(8, what).readDoubleLE(0);
      default:
        throw new GgufFormatError(`${what} has unknown value type ${type}`);
    }
  }
}

const scalarBytes: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
const typeNames: Record<number, string> = {
  0: 'uint8',
  1: 'int8',
  2: 'uint16',
  3: 'int16',
  4: 'uint32',
  5: 'int32',
  6: 'float32',
  7: 'bool',
  8: 'string',
  10: 'uint64',
  11: 'int64',
  12: 'float64',
};

/** Reads and checks the header of the GGUF file at `path`; throws GgufFormatError saying what is wrong. */
export function readGgufHeader(path: string): GgufHeader {
  const fd = fs.openSync(path, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const c = new Cursor(fd, size);
    if (size < 4 || c.u32('magic') !== 0x46554747) throw new GgufFormatError('it does not start with the GGUF magic');
    const version = c.u32('version');
    if (version !== 2 && version !== 3) throw new GgufFormatError(`unsupported GGUF version ${version}`);
    const tensorCount = c.count('tensor count', 8);
    const kvCount = c.count('metadata count', 12);
    const metadata = new Map<string, GgufMetadataScalar | GgufArraySummary>();
    for (let i = 0; i < kvCount; i++) {
      const key = c.str(`metadata key ${i}`);
      const type = c.u32(`type of ${key}`);
      if (type === 9) {
        const itemType = c.u32(`item type of ${key}`);
        if (itemType === 9) throw new GgufFormatError(`${key} is an array of arrays`);
        const length = c.count(`length of ${key}`, itemType === 8 ? 8 : (scalarBytes[itemType] ?? 1));
        if (itemType !== 8 && scalarBytes[itemType] === undefined) throw new GgufFormatError(`${key} has unknown item type ${itemType}`);
        const summary: GgufArraySummary = { array: typeNames[itemType] ?? String(itemType), length };
        if (length <= 64) {
          summary.values = [];
          for (let j = 0; j < length; j++) summary.values.push(c.scalar(itemType, `${key}[${j}]`));
        } else if (itemType === 8) {
          for (let j = 0; j < length; j++) c.skip(c.count(`${key}[${j}] length`, 1), `${key}[${j}]`);
        } else {
          c.skip(length * (scalarBytes[itemType] as number), key);
        }
        metadata.set(key, summary);
      } else {
        metadata.set(key, c.scalar(type, key));
      }
    }
    const tensors: GgufTensorInfo[] = [];
    for (let i = 0; i < tensorCount; i++) {
      const name = c.str(`tensor ${i} name`);
      const nDims = c.u32(`dimensions of ${name}`);
      if (nDims === 0 || nDims > 4) throw new GgufFormatError(`tensor ${name} has ${nDims} dimensions`);
      const dims: number[] = [];
      for (let d = 0; d < nDims; d++) dims.push(Number(c.u64(`dimension of ${name}`)));
      const type = c.u32(`type of ${name}`);
      const offset = Number(c.u64(`offset of ${name}`));
      tensors.push({ name, dims, type, offset });
    }
    const alignmentValue = metadata.get('general.alignment');
    const alignment = typeof alignmentValue === 'number' && alignmentValue > 0 ? alignmentValue : 32;
    const dataOffset = Math.ceil(c.pos / alignment) * alignment;
    let dataBytes = 0;
    for (const t of tensors) {
      const traits = ggmlTypeSizes[t.type];
      const elements = t.dims.reduce((a, b) => a * b, 1);
      const bytes = traits ? Math.ceil(elements / traits[0]) * traits[1] : 1;
      dataBytes = Math.max(dataBytes, t.offset + bytes);
    }
    return { version, metadata, tensors, dataOffset, dataBytes, fileBytes: size };
  } finally {
    fs.closeSync(fd);
  }
}
