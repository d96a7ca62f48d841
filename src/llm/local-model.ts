import { createHash } from 'node:crypto';
import type { BigIntStats } from 'node:fs';
import fs from 'node:fs/promises';
import { GgufFormatError, type GgufHeader, readGgufHeader } from './gguf-reader.js';

const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err)).slice(0, 300);

export interface LocalModelInfo {
  path: string;
  architecture: string;
  name: string | undefined;
  fileBytes: number;
  trainContextSize: number | undefined;
  /**
   * Which model this file holds, for the cache key: `gguf-<sha256 of the header>-<bytes>-<mtime ns>`.
   * The header (metadata, tokenizer, tensor table) tells models apart by architecture, quantization and
   * name; the size and modification time tell apart files with the same header (two fine-tunes of one
   * base) and any rewrite of the file. The path is left out, so a file moved (mtime kept) keeps its
   * cache. Reading the tensor data instead would take seconds to minutes on a multi-GB model.
   */
  identity: string;
}

/**
 * Checks, without loading it, that `modelPath` names a readable GGUF model:
 * main.ts calls it at start so that a wrong CHATWIRE_MODEL_PATH stops the
 * start with this message instead of failing the first chat. Throws an Error
 * whose message names the path and the problem.
 */
export async function validateLocalModel(modelPath: string | undefined): Promise<LocalModelInfo> {
  if (modelPath === undefined || modelPath === '') {
    throw new Error('CHATWIRE_MODEL_PATH is not set: the local provider needs the path of a GGUF model file');
  }
  let stat: BigIntStats;
  try {
    stat = await fs.stat(modelPath, { bigint: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Error(`model file ${modelPath} ${code === 'ENOENT' ? 'does not exist' : `cannot be read (${code ?? 'unknown error'})`}`);
  }
  if (!stat.isFile()) throw new Error(`model file ${modelPath} is not a file`);
  let header: GgufHeader;
  try {
    header = readGgufHeader(modelPath);
  } catch (err) {
    if (err instanceof GgufFormatError) throw new Error(`model file ${modelPath} is not a valid GGUF file (${err.message})`);
    throw new Error(`model file ${modelPath} cannot be read (${(err as NodeJS.ErrnoException).code ?? errorText(err)})`);
  }
  const architecture = header.metadata.get('general.architecture');
  if (typeof architecture !== 'string' || architecture === '') {
    throw new Error(`model file ${modelPath} has no general.architecture: not a GGUF language model`);
  }
  // A download cut short keeps its header: the tensor data must be all there.
  const needed = header.dataOffset + header.dataBytes;
  if (needed > header.fileBytes) throw new Error(`model file ${modelPath} is truncated (${header.fileBytes} bytes, its tensors need ${needed})`);
  const name = header.metadata.get('general.name');
  const contextLength = header.metadata.get(`${architecture}.context_length`);
  let headerDigest: string;
  try {
    headerDigest = await digestOfStart(modelPath, header.dataOffset);
  } catch (err) {
    throw new Error(`model file ${modelPath} cannot be read (${(err as NodeJS.ErrnoException).code ?? errorText(err)})`);
  }
  return {
    path: modelPath,
    architecture,
    name: typeof name === 'string' ? name : undefined,
    fileBytes: header.fileBytes,
    trainContextSize: typeof contextLength === 'number' ? contextLength : undefined,
    identity: `gguf-${headerDigest}-${header.fileBytes}-${stat.mtimeNs}`,
  };
}

/** sha256 (hex) of the first `bytes` bytes of the file. */
async function digestOfStart(filePath: string, bytes: number): Promise<string> {
  const hash = createHash('sha256');
  const file = await fs.open(filePath, 'r');
  try {
    const buf = Buffer.allocUnsafe(Math.min(bytes, 1 << 20));
    for (let at = 0; at < bytes; ) {
      const { bytesRead } = await file.read(buf, 0, Math.min(buf.length, bytes - at), at);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
      at += bytesRead;
    }
  } finally {
    await file.close();
  }
  return hash.digest('hex');
}
