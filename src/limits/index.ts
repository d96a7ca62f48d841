export * from './rate-limits.js';
export { retryAfterSeconds } from './ratelimit-headers.js';
export * from './egress.js';
