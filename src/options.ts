/**
 * The options of createChatwire(), derived from the settings table in config.ts: an option's name is the table's
 * key (the environment variable's name in camelCase, without the CHATWIRE_ prefix), its type is what the setting's
 * schema produces, its default and bounds are the setting's, and a bad value is refused with the setting's own
 * message, naming the option instead of the variable.
 */
import type { z } from 'zod';
import { ConfigError, loadConfig, settings, type Config } from './config.js';

type Settings = typeof settings;
export type SettingName = keyof Settings;

/** Every setting as an option: typed as the value it resolves to (a number, a boolean, a string, a list), all optional. */
export type SettingOptions = { readonly [K in SettingName]?: z.output<Settings[K]['schema']> | undefined };

export class OptionsError extends ConfigError {
  override name = 'OptionsError';
}

const SETTING_NAMES = new Set(Object.keys(settings));

export function isSettingName(name: string): name is SettingName {
  return SETTING_NAMES.has(name);
}

/** The text an environment variable would hold for `value`, or null when the value is of no type a setting takes. */
function asSettingText(value: unknown): string | null {
  if (typeof value === 'string') return value;
  // Decimal notation, as the variable would be written: String(1e-7) is '1e-7', which no setting reads.
  if (typeof value === 'number') return Number.isFinite(value) ? (String(value).includes('e') ? value.toFixed(20) : String(value)) : null;
  if (typeof value === 'boolean') return String(value);
  if (Array.isArray(value) && value.every((v) => typeof v === 'string')) return value.join(',');
  return null;
}

/** A value given in its resolved form (not as text) must resolve to the same kind: `devFaults: 1` is not a boolean. */
function sameKind(given: unknown, parsed: unknown): boolean {
  if (typeof given === 'string') return true;
  if (Array.isArray(given)) return Array.isArray(parsed) || parsed === '*';
  return typeof given === typeof parsed;
}

function kindOf(parsed: unknown): string {
  if (Array.isArray(parsed)) return 'a list of strings';
  return typeof parsed === 'boolean' ? 'true or false' : typeof parsed === 'number' ? 'a number' : 'a string';
}

/** The problem with one option's value, or null when the setting's schema accepts it. */
function optionProblem(name: SettingName, value: unknown): string | null {
  const text = asSettingText(value);
  const schema = settings[name].schema as z.ZodType;
  if (text === null) {
    const probe = schema.safeParse(settings[name].default);
    return `expected ${probe.success && probe.data !== undefined ? kindOf(probe.data) : 'a string'}, got ${Array.isArray(value) ? 'a list' : typeof value}`;
  }
  const parsed = schema.safeParse(text);
  if (!parsed.success) return parsed.error.issues[0]?.message ?? 'invalid';
  if (!sameKind(value, parsed.data)) return `expected ${kindOf(parsed.data)}, got ${typeof value}`;
  return null;
}

/**
 * Resolves setting options (unset = the setting's default; the environment is not read) into a Config. Throws one
 * OptionsError listing every bad option as `invalid option <name>: <the setting's message>`; a name that is not an
 * option is refused too (a typo would otherwise silently leave the default).
 */
export function configFromOptions(options: Record<string, unknown>, extraNames: readonly string[] = []): Config {
  const problems: string[] = [];
  const overrides: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(options)) {
    if (!isSettingName(name)) {
      if (!extraNames.includes(name)) problems.push(`unknown option ${name}`);
      continue;
    }
    if (value === undefined) continue;
    const problem = optionProblem(name, value);
    if (problem !== null) problems.push(`invalid option ${name}: ${problem}`);
    else overrides[name] = value;
  }
  if (problems.length > 0) throw new OptionsError(problems.join('; '));
  return loadConfig({}, overrides);
}

/**
 * Every setting read from the environment (process.env by default), unset ones at their defaults: what the
 * chatwire program passes to createChatwire(). A bad value throws ConfigError naming the variable.
 */
export function optionsFromEnv(env: Record<string, string | undefined> = process.env): Required<SettingOptions> {
  const { dataPath: _resolved, ...options } = loadConfig(env);
  return options as Required<SettingOptions>;
}
