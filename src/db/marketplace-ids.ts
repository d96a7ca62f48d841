/**
 * Wire ids of the marketplace: a kind prefix and the row's integer key padded
 * to ten digits ('c_0000000042'). Fixed width makes the strings sort exactly
 * like the numbers, so "newest first, then id descending" means the same to a
 * client comparing the opaque strings as to the index comparing integers
 * (002_marketplace.sql caps every id at ten digits for this reason).
 */
export const idPrefixes = { consumer: 'c', provider: 'p', request: 'r', booking: 'b' } as const;
export type IdKind = keyof typeof idPrefixes;

const ID_DIGITS = 10;
const MAX_ID = 10 ** ID_DIGITS - 1;
const patterns = Object.fromEntries(Object.entries(idPrefixes).map(([kind, prefix]) => [kind, new RegExp(`^${prefix}_(\\d{${ID_DIGITS}})$`)])) as Record<
  IdKind,
  RegExp
>;

const heads = Object.fromEntries(Object.entries(idPrefixes).map(([kind, prefix]) => [kind, `${prefix}_`])) as Record<IdKind, string>;
const ZEROS = '0'.repeat(ID_DIGITS);

/**
 * The wire form of a key, and the definition the SQL statements match
 * (idJson in marketplace-queries.ts; a test holds them equal). A slice of a
 * constant pads in a fifth of the time padStart takes.
 */
export function formatId(kind: IdKind, key: number): string {
  if (!Number.isSafeInteger(key) || key < 1 || key > MAX_ID) throw new RangeError(`${kind} id out of range: ${key}`);
  const digits = String(key);
  return heads[kind] + ZEROS.slice(digits.length) + digits;
}

/** The integer key of a wire id, or null when the string is not an id of this kind (so no such record exists). */
export function parseId(kind: IdKind, id: string): number | null {
  const m = patterns[kind].exec(id);
  if (!m) return null;
  const key = Number(m[1]);
  return key >= 1 ? key : null;
}

const TWO_DIGITS = Array.from({ length: 100 }, (_, i) => String(i).padStart(2, '0'));
const THREE_DIGITS = Array.from({ length: 1000 }, (_, i) => String(i).padStart(3, '0'));
/** 10000-01-01T00:00:00Z: from here on toISOString switches to six-digit years. */
export const YEAR_10000_MS = 253_402_300_800_000;
const DAY_MS = 86_400_000;

/** 'YYYY-MM-DDT' of a day since the epoch (0 to 2,932,896): Howard Hinnant's civil_from_days. */
function dayHead(days: number): string {
  const z = days + 719_468; // days since 0000-03-01
  const era = Math.floor(z / 146_097);
  const dayOfEra = z - era * 146_097;
  const yearOfEra = Math.floor((dayOfEra - Math.floor(dayOfEra / 1460) + Math.floor(dayOfEra / 36_524) - Math.floor(dayOfEra / 146_096)) / 365);
  const dayOfYear = dayOfEra - (365 * yearOfEra + Math.floor(yearOfEra / 4) - Math.floor(yearOfEra / 100));
  const monthFromMarch = Math.floor((5 * dayOfYear + 2) / 153);
  const day = dayOfYear - Math.floor((153 * monthFromMarch + 2) / 5) + 1;
  const month = monthFromMarch < 10 ? monthFromMarch + 3 : monthFromMarch - 9;
  const year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0);
  const two = TWO_DIGITS as readonly string[];
  return `${two[Math.floor(year / 100)]}${two[year % 100]}-${two[month]}-${two[day]}T`;
}

/** The day heads formatted lately: a page's times fall on far fewer days than it has rows. */
const dayHeads = new Map<number, string>();
const DAY_HEADS_KEPT = 4096;

/**
 * Stored times are epoch milliseconds; the wire carries ISO-8601 UTC, exactly
 * as Date#toISOString writes it. The lookups' SQL writes the same text
 * (timeJson in marketplace-queries.ts, held equal by a test) and calls this
 * for what SQLite's dates cannot write. Done by hand for callers that format
 * many times in JavaScript (toISOString was a seventh of a 100-item page's
 * time when pages were built here): the date part is computed once per day
 * (kept for the last few thousand days), the time of day from table lookups.
 * Outside years 1970-9999 it defers to toISOString.
 */
export function isoTime(ms: number): string {
  if (!(Number.isSafeInteger(ms) && ms >= 0 && ms < YEAR_10000_MS)) return new Date(ms).toISOString();
  const days = Math.floor(ms / DAY_MS);
  let head = dayHeads.get(days);
  if (head === undefined) {
    if (dayHeads.size >= DAY_HEADS_KEPT) dayHeads.clear();
    head = dayHead(days);
    dayHeads.set(days, head);
  }
  let rest = ms - days * DAY_MS;
  const hours = Math.floor(rest / 3_600_000);
  rest -= hours * 3_600_000;
  const minutes = Math.floor(rest / 60_000);
  rest -= minutes * 60_000;
  const seconds = Math.floor(rest / 1000);
  const two = TWO_DIGITS as readonly string[];
  return `${head}${two[hours]}:${two[minutes]}:${two[seconds]}.${THREE_DIGITS[rest - seconds * 1000]}Z`;
}
