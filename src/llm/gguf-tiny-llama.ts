import { writeGgufFile, type GgufTensor, type GgufValue } from './gguf-writer.js';

/**
 * A tiny llama-architecture GGUF with random weights, for tests and
 * benchmarks of the local provider where no real model can be downloaded.
 * It has a SentencePiece-style ("llama") vocabulary that llama.cpp accepts:
 * <unk>, <s>, </s>, the 256 byte-fallback tokens, and word pieces. The output
 * is gibberish made of whole words: the weights are shaped so that control,
 * byte and partial-word tokens are never sampled (see `suppressed` below), so
 * the text streams as readable UTF-8 and generation never stops on </s> by
 * chance; maxTokens or the context size is what ends it.
 */

export interface TinyLlamaOptions {
  /** Seed of the weights; the same options give the same file. */
  seed?: number;
  embeddingLength?: number;
  blockCount?: number;
  headCount?: number;
  headCountKv?: number;
  feedForwardLength?: number;
  /** Training context length written to the metadata. */
  contextLength?: number;
}

export interface TinyLlamaInfo {
  path: string;
  bytes: number;
  vocabSize: number;
  parameters: number;
  /** The words the model emits (each a single token, "▁word"). */
  words: readonly string[];
}

const WORDS = (
  'the a an and or but with for to from in on at by of is are was be can will would should could may this that it ' +
  'you we they he she quote price booking request schedule service provider job home repair clean garden paint move ' +
  'plumber electrician available tomorrow morning afternoon evening week estimate hour hours fixed rate materials ' +
  'deposit confirm review rating local licensed insured team visit inspect measure replace install fix check quick ' +
  'simple careful friendly trusted nearby today soon next flexible budget detail photo size room kitchen bath roof ' +
  'fence floor wall window door light water heat cool yes no please thanks hello here there when where how what why'
).split(' ');

const SPACE = '\u2581'; // SentencePiece's word-start marker

// llama_token_type in llama.cpp
const TOKEN_NORMAL = 1;
const TOKEN_UNKNOWN = 2;
const TOKEN_CONTROL = 3;
const TOKEN_BYTE = 6;

/** mulberry32: a small seeded PRNG, so fixtures are reproducible without a dependency. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Vocab {
  tokens: string[];
  scores: number[];
  types: number[];
  /** Token ids that the model must never emit. */
  suppressed: Set<number>;
}

function buildVocab(): Vocab {
  const tokens: string[] = ['<unk>', '<s>', '</s>'];
  const scores: number[] = [0, 0, 0];
  const types: number[] = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL];
  const suppressed = new Set<number>([0, 1, 2]);
  for (let b = 0; b < 256; b++) {
    suppressed.add(tokens.length);
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    scores.push(0);
    types.push(TOKEN_BYTE);
  }
  const seen = new Set(tokens);
  const add = (piece: string, emit: boolean) => {
    if (seen.has(piece)) {
      if (emit) suppressed.delete(tokens.indexOf(piece));
      return;
    }
    seen.add(piece);
    if (!emit) suppressed.add(tokens.length);
    tokens.push(piece);
    // SPM merges the adjacent pair whose union has the highest score: longer pieces win.
    scores.push(-1000 + piece.length);
    types.push(TOKEN_NORMAL);
  };
  add(SPACE, false);
  for (const c of 'abcdefghijklmnopqrstuvwxyz') add(c, false);
  // Every prefix of "▁word" is a token, so the SPM merges can always build the whole word.
  for (const w of WORDS) {
    const piece = SPACE + w;
    for (let i = 2; i < piece.length; i++) add(piece.slice(0, i), false);
    add(piece, true);
  }
  for (const p of ['.', ',', '?', '!']) add(p, true);
  return { tokens, scores, types, suppressed };
}

/** Writes the model to `path` and describes it. */
export function writeTinyLlamaGguf(path: string, options: TinyLlamaOptions = {}): TinyLlamaInfo {
  const seed = options.seed ?? 1;
  const nEmbd = options.embeddingLength ?? 64;
  const nLayer = options.blockCount ?? 2;
  const nHead = options.headCount ?? 4;
  const nHeadKv = options.headCountKv ?? nHead;
  const nFf = options.feedForwardLength ?? nEmbd * 2;
  const nCtx = options.contextLength ?? 4096;
  if (nEmbd % nHead !== 0 || nHead % nHeadKv !== 0) throw new Error('embeddingLength must divide by headCount, headCount by headCountKv');
  const headDim = nEmbd / nHead;
  const nEmbdKv = headDim * nHeadKv;
  const vocab = buildVocab();
  const nVocab = vocab.tokens.length;
  const rand = prng(seed);

  // Uniform values with standard deviation `std`.
  const randomTensor = (n: number, std: number) => () => {
    const out = new Float32Array(n);
    const a = std * Math.sqrt(3);
    for (let i = 0; i < n; i++) out[i] = (rand() * 2 - 1) * a;
    return out;
  };
  const ones = (n: number) => () => new Float32Array(n).fill(1);

  // Every token embedding carries a constant 1 in dimension 0 and the layers add
  // only small updates, so after the final RMS norm dimension 0 of the hidden
  // state is always large and positive. An output row with a large negative
  // weight there gets a logit far below every other one: that token is never sampled.
  const tokenEmbd = () => {
    const out = randomTensor(nEmbd * nVocab, 0.1)();
    for (let t = 0; t < nVocab; t++) out[t * nEmbd] = 1;
    return out;
  };
  const output = () => {
    const out = randomTensor(nEmbd * nVocab, 1)();
    for (let t = 0; t < nVocab; t++) out[t * nEmbd] = vocab.suppressed.has(t) ? -20 : 0;
    return out;
  };
  const small = 0.02;
  const tensors: GgufTensor[] = [
    { name: 'token_embd.weight', dims: [nEmbd, nVocab], data: tokenEmbd },
    { name: 'output_norm.weight', dims: [nEmbd], data: ones(nEmbd) },
    { name: 'output.weight', dims: [nEmbd, nVocab], data: output },
  ];
  for (let i = 0; i < nLayer; i++) {
    tensors.push(
      { name: `blk.${i}.attn_norm.weight`, dims: [nEmbd], data: ones(nEmbd) },
      { name: `blk.${i}.attn_q.weight`, dims: [nEmbd, nEmbd], data: randomTensor(nEmbd * nEmbd, small) },
      { name: `blk.${i}.attn_k.weight`, dims: [nEmbd, nEmbdKv], data: randomTensor(nEmbd * nEmbdKv, small) },
      { name: `blk.${i}.attn_v.weight`, dims: [nEmbd, nEmbdKv], data: randomTensor(nEmbd * nEmbdKv, small) },
      { name: `blk.${i}.attn_output.weight`, dims: [nEmbd, nEmbd], data: randomTensor(nEmbd * nEmbd, small) },
      { name: `blk.${i}.ffn_norm.weight`, dims: [nEmbd], data: ones(nEmbd) },
      { name: `blk.${i}.ffn_gate.weight`, dims: [nEmbd, nFf], data: randomTensor(nEmbd * nFf, small) },
      { name: `blk.${i}.ffn_down.weight`, dims: [nFf, nEmbd], data: randomTensor(nFf * nEmbd, small) },
      { name: `blk.${i}.ffn_up.weight`, dims: [nEmbd, nFf], data: randomTensor(nEmbd * nFf, small) },
    );
  }

  const u32 = (value: number): GgufValue => ({ type: 'uint32', value });
  const metadata: Array<readonly [string, GgufValue]> = [
    ['general.architecture', { type: 'string', value: 'llama' }],
    ['general.name', { type: 'string', value: `chatwire tiny llama (random weights, seed ${seed})` }],
    ['general.file_type', u32(0)], // all F32
    ['llama.vocab_size', u32(nVocab)],
    ['llama.context_length', u32(nCtx)],
    ['llama.embedding_length', u32(nEmbd)],
    ['llama.block_count', u32(nLayer)],
    ['llama.feed_forward_length', u32(nFf)],
    ['llama.attention.head_count', u32(nHead)],
    ['llama.attention.head_count_kv', u32(nHeadKv)],
    ['llama.attention.layer_norm_rms_epsilon', { type: 'float32', value: 1e-5 }],
    ['llama.rope.dimension_count', u32(headDim)],
    ['llama.rope.freq_base', { type: 'float32', value: 10000 }],
    ['tokenizer.ggml.model', { type: 'string', value: 'llama' }],
    ['tokenizer.ggml.tokens', { type: 'array', itemType: 'string', value: vocab.tokens }],
    ['tokenizer.ggml.scores', { type: 'array', itemType: 'float32', value: vocab.scores }],
    ['tokenizer.ggml.token_type', { type: 'array', itemType: 'int32', value: vocab.types }],
    ['tokenizer.ggml.unknown_token_id', u32(0)],
    ['tokenizer.ggml.bos_token_id', u32(1)],
    ['tokenizer.ggml.eos_token_id', u32(2)],
    ['tokenizer.ggml.add_bos_token', { type: 'bool', value: true }],
    ['tokenizer.ggml.add_eos_token', { type: 'bool', value: false }],
  ];
  const { bytes } = writeGgufFile(path, metadata, tensors);
  const parameters = tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0);
  return { path, bytes, vocabSize: nVocab, parameters, words: WORDS };
}
