/**
 * The extension's settings: which ones exist, their types, and how they become the
 * server's `initializationOptions.parafill` (camelCase keys on the wire).
 *
 * Pure: no `vscode` import, so it is tested directly. It never throws on bad
 * values; a wrong-typed value is dropped (the server's default applies) and named
 * in `problems` so the user hears about it once.
 */

export type SettingType = 'boolean' | 'string' | 'integer' | 'number' | 'string[]';

export interface SettingSpec {
  /** Key under `parafill.` in VS Code and, for server settings, the camelCase wire name. */
  key: string;
  type: SettingType;
  /** Sent to the server (true) or used by the extension itself (false). */
  server: boolean;
  minimum?: number;
  /** Values must be strictly greater than this. */
  exclusiveMinimum?: number;
  maximum?: number;
  enum?: readonly string[];
}

export const SETTINGS: readonly SettingSpec[] = [
  { key: 'enable', type: 'boolean', server: false },
  { key: 'serverCommand', type: 'string[]', server: false },
  { key: 'pythonPath', type: 'string', server: false },
  { key: 'completionMenu', type: 'boolean', server: false },
  { key: 'model', type: 'string', server: true },
  { key: 'device', type: 'string', server: true, enum: ['auto', 'cpu', 'cuda'] },
  { key: 'contextTokens', type: 'integer', server: true, minimum: 64, maximum: 1048576 },
  { key: 'spanTokensLine', type: 'integer', server: true, minimum: 1, maximum: 1024 },
  { key: 'spanTokensBlock', type: 'integer', server: true, minimum: 1, maximum: 1024 },
  { key: 'steps', type: 'integer', server: true, minimum: 0, maximum: 1024 },
  { key: 'confidenceThreshold', type: 'number', server: true, exclusiveMinimum: 0, maximum: 1 },
  { key: 'minConfidence', type: 'number', server: true, minimum: 0, maximum: 1 },
  { key: 'debounceMs', type: 'integer', server: true, minimum: 0, maximum: 10000 },
  { key: 'latencyBudgetMs', type: 'integer', server: true, minimum: 0, maximum: 60000 },
  { key: 'threads', type: 'integer', server: true, minimum: 0, maximum: 1024 },
  { key: 'enabledLanguages', type: 'string[]', server: true },
  { key: 'maxSnippets', type: 'integer', server: true, minimum: 0, maximum: 16 },
  { key: 'repoDrafts', type: 'boolean', server: true },
  { key: 'engine', type: 'string', server: true },
  { key: 'engineTokenFile', type: 'string', server: true },
  { key: 'engineFallback', type: 'string', server: true, enum: ['none', 'local'] },
  { key: 'openModelWeights', type: 'string', server: true, enum: ['auto', 'bf16', 'int8', 'fp32'] },
  { key: 'openModelKeystrokeCache', type: 'boolean', server: true },
  { key: 'verboseLogging', type: 'boolean', server: true },
];

export interface ClientSettings {
  enable: boolean;
  serverCommand: string[];
  pythonPath: string;
  completionMenu: boolean;
}

export interface ResolvedSettings {
  client: ClientSettings;
  /** Only the values the user set and that passed validation: the server owns the defaults. */
  server: Record<string, unknown>;
  /** One sentence per rejected value, naming the setting and what it expects. */
  problems: string[];
}

const CLIENT_DEFAULTS: ClientSettings = {
  enable: true,
  serverCommand: [],
  pythonPath: '',
  completionMenu: false,
};

function describe(spec: SettingSpec): string {
  switch (spec.type) {
    case 'string[]':
      return 'a list of strings';
    case 'integer':
      return 'a whole number' + range(spec);
    case 'number':
      return 'a number' + range(spec);
    case 'string':
      return spec.enum ? `one of ${spec.enum.map((e) => `"${e}"`).join(', ')}` : 'a string';
    default:
      return `a ${spec.type}`;
  }
}

function range(spec: SettingSpec): string {
  if (spec.exclusiveMinimum !== undefined) {
    const upper = spec.maximum !== undefined ? ` and at most ${spec.maximum}` : '';
    return ` greater than ${spec.exclusiveMinimum}${upper}`;
  }
  if (spec.minimum !== undefined && spec.maximum !== undefined) {
    return ` from ${spec.minimum} to ${spec.maximum}`;
  }
  if (spec.minimum !== undefined) {
    return ` ≥ ${spec.minimum}`;
  }
  return '';
}

/** Whether `value` fits `spec`. */
export function isValid(spec: SettingSpec, value: unknown): boolean {
  switch (spec.type) {
    case 'boolean':
      return typeof value === 'boolean';
    case 'string':
      return typeof value === 'string' && (!spec.enum || spec.enum.includes(value));
    case 'string[]':
      return Array.isArray(value) && value.every((v) => typeof v === 'string');
    case 'integer':
    case 'number': {
      if (typeof value !== 'number' || !Number.isFinite(value)) {
        return false;
      }
      if (spec.type === 'integer' && !Number.isInteger(value)) {
        return false;
      }
      if (spec.minimum !== undefined && value < spec.minimum) {
        return false;
      }
      if (spec.exclusiveMinimum !== undefined && value <= spec.exclusiveMinimum) {
        return false;
      }
      return spec.maximum === undefined || value <= spec.maximum;
    }
  }
}

/**
 * Read every setting through `get` (which returns `undefined` for a setting the
 * user did not set) and split them into client and server settings.
 */
export function resolveSettings(get: (key: string) => unknown): ResolvedSettings {
  const client: ClientSettings = { ...CLIENT_DEFAULTS, serverCommand: [] };
  const server: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const spec of SETTINGS) {
    const value = get(spec.key);
    if (value === undefined || value === null) {
      continue;
    }
    if (!isValid(spec, value)) {
      problems.push(
        `"parafill.${spec.key}" must be ${describe(spec)}, not ${JSON.stringify(value)}; using the default.`,
      );
      continue;
    }
    if (spec.server) {
      server[spec.key] = value;
    } else {
      (client as unknown as Record<string, unknown>)[spec.key] = value;
    }
  }
  return { client, server, problems };
}

/** The settings whose change needs a new server process (not just didChangeConfiguration). */
export const RESTART_KEYS: readonly string[] = ['serverCommand', 'pythonPath'];
