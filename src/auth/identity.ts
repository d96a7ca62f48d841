import type { Role } from '../protocol/index.js';

/** Who is calling: every transport resolves one of these before any message is handled. */
export interface Identity {
  userId: string;
  role: Role;
}

/** Staff may read any consumer's records; a consumer only its own. */
export function canReadConsumer(caller: Identity, consumerId: string): boolean {
  return caller.role === 'staff' || caller.userId === consumerId;
}
