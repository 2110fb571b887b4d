/**
 * Which process to start for the language server, and whether it exists.
 *
 * Pure apart from the injected file-system check, so it is tested directly.
 * It must not start anything: the language client does that.
 */
import * as path from 'node:path';

import type { ClientSettings } from './settings';

export interface ServerCommand {
  command: string;
  args: string[];
  /** Where the command came from, for messages ("parafill.serverCommand", ...). */
  source: string;
}

export interface CommandProblem {
  /** One sentence the user can act on. */
  message: string;
  /** The setting to open as the fix. */
  setting: string;
}

export interface Environment {
  platform: NodeJS.Platform;
  env: Record<string, string | undefined>;
  /** True when `file` exists and is a file the user may execute. */
  isExecutable(file: string): boolean;
}

export const DEFAULT_COMMAND: readonly string[] = ['parafill', 'serve'];

/** The command the settings ask for: serverCommand, else pythonPath -m lsp_server serve, else `parafill serve`. */
export function chooseServerCommand(settings: ClientSettings): ServerCommand {
  if (settings.serverCommand.length > 0) {
    const [command, ...args] = settings.serverCommand;
    return { command, args, source: 'parafill.serverCommand' };
  }
  if (settings.pythonPath.trim() !== '') {
    return {
      command: settings.pythonPath.trim(),
      args: ['-m', 'lsp_server', 'serve'],
      source: 'parafill.pythonPath',
    };
  }
  const [command, ...args] = DEFAULT_COMMAND;
  return { command, args, source: 'the default' };
}

/** Find `command` the way a shell would: as a path if it has a separator, else on PATH. */
export function findExecutable(command: string, environment: Environment): string | undefined {
  const windows = environment.platform === 'win32';
  const extensions = windows
    ? ['', ...(environment.env.PATHEXT ?? '.EXE;.CMD;.BAT;.COM').split(';').filter(Boolean)]
    : [''];
  const hasSeparator = command.includes('/') || (windows && command.includes('\\'));
  const expanded = command.startsWith('~') && environment.env.HOME
    ? path.join(environment.env.HOME, command.slice(1))
    : command;
  const candidates: string[] = [];
  if (hasSeparator || path.isAbsolute(expanded)) {
    for (const ext of extensions) {
      candidates.push(expanded + ext);
    }
  } else {
    const pathVar = environment.env.PATH ?? environment.env.Path ?? '';
    const separator = windows ? ';' : ':';
    for (const dir of pathVar.split(separator).filter(Boolean)) {
      for (const ext of extensions) {
        candidates.push(path.join(dir, command + ext));
      }
    }
  }
  return candidates.find((candidate) => environment.isExecutable(candidate));
}

/** The command to start, or a problem that says how to fix the settings. */
export function resolveServerCommand(
  settings: ClientSettings,
  environment: Environment,
): ServerCommand | CommandProblem {
  const chosen = chooseServerCommand(settings);
  if (chosen.command.trim() === '') {
    return {
      message: `The server command from ${chosen.source} is empty; set it to e.g. ["parafill", "serve"].`,
      setting: 'parafill.serverCommand',
    };
  }
  const found = findExecutable(chosen.command, environment);
  if (found) {
    return { ...chosen, command: found };
  }
  if (chosen.source === 'the default') {
    return {
      message:
        'The parafill server was not found on PATH. Install it from its source folder ' +
        '(`pipx install /path/to/parafill`, or `pip install /path/to/parafill` in a virtual environment) or set ' +
        '"parafill.pythonPath" to a Python that has it.',
      setting: 'parafill.pythonPath',
    };
  }
  return {
    message: `The server command "${chosen.command}" (from ${chosen.source}) was not found or is not executable; fix the setting.`,
    setting: chosen.source === 'parafill.pythonPath' ? 'parafill.pythonPath' : 'parafill.serverCommand',
  };
}

export function isProblem(value: ServerCommand | CommandProblem): value is CommandProblem {
  return (value as CommandProblem).message !== undefined;
}
