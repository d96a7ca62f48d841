import fs from 'node:fs/promises';
import { GgufFormatError, readGgufHeader } from './gguf-reader.js';

const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err)).slice(0, 300);

export interface LocalModelInfo {
  path: string;
  architecture: string;
  name: string | undefined;
  fileBytes: number;
  trainContextSize: number | undefined;
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
  let stat;
  try {
    stat = await fs.stat(modelPath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Error(`model file ${modelPath} ${code === 'ENOENT' ? 'does not exist' : `cannot be read (${code ?? 'unknown error'})`}`);
  }
  if (!stat.isFile()) throw new Error(`model file ${modelPath} is not a file`);
  let header;
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
  return {
    path: modelPath,
    architecture,
    name: typeof name === 'string' ? name : undefined,
    fileBytes: header.fileBytes,
    trainContextSize: typeof contextLength === 'number' ? contextLength : undefined,
  };
}
