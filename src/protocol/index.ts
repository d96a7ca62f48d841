export * from './errors.js';
export * from './messages.js';
export * from './parse.js';
export * from './frame-shape.js';
export * from './ai-sdk.js';
export * from './openai.js';
