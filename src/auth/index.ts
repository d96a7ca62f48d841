export * from './auth.js';
export * from './claims.js';
export * from './credentials.js';
export * from './identity.js';
export * from './sign.js';
export * from './anonymous.js';
