/**
 * A stand-in for the `vscode` module, which only exists inside VS Code. It records
 * what the extension asks of the editor (commands registered, messages shown,
 * settings written) so tests can check them. Installing it hooks Node's module
 * resolution so that `require('vscode')` (from the extension and from
 * vscode-languageclient) returns this object.
 */
import Module = require('node:module');

type Listener<T> = (value: T) => unknown;

export class EventEmitter<T> {
  private listeners: Listener<T>[] = [];
  event = (listener: Listener<T>) => {
    this.listeners.push(listener);
    return { dispose: () => (this.listeners = this.listeners.filter((l) => l !== listener)) };
  };
  fire(value: T): void {
    for (const listener of this.listeners) {
      listener(value);
    }
  }
  dispose(): void {
    this.listeners = [];
  }
}

export class Disposable {
  constructor(private readonly fn: () => void = () => undefined) {}
  static from(...items: { dispose(): unknown }[]): Disposable {
    return new Disposable(() => items.forEach((i) => i.dispose()));
  }
  dispose(): void {
    this.fn();
  }
}

export interface Shown {
  severity: 'error' | 'warning' | 'info';
  message: string;
  actions: string[];
}

export function createVscodeStub() {
  const shown: Shown[] = [];
  const commands = new Map<string, (...args: unknown[]) => unknown>();
  const executed: { command: string; args: unknown[] }[] = [];
  const settings = new Map<string, unknown>();
  const configListeners = new EventEmitter<{ affectsConfiguration(section: string): boolean }>();
  const statusBarItems: Record<string, unknown>[] = [];
  const output: string[] = [];
  let answer: (message: Shown) => string | undefined = () => undefined;

  const message = (severity: Shown['severity']) => (text: string, ...actions: string[]) => {
    const entry = { severity, message: text, actions };
    shown.push(entry);
    return Promise.resolve(answer(entry));
  };

  const vscode = {
    // Makes TypeScript's `import * as` use this object as is, so the Proxy below sees every lookup.
    __esModule: true,
    EventEmitter,
    Disposable,
    StatusBarAlignment: { Left: 1, Right: 2 },
    ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
    window: {
      showErrorMessage: message('error'),
      showWarningMessage: message('warning'),
      showInformationMessage: message('info'),
      createOutputChannel: (name: string) => ({
        name,
        info: (line: string) => output.push(line),
        appendLine: (line: string) => output.push(line),
        show: () => undefined,
        dispose: () => undefined,
      }),
      createStatusBarItem: () => {
        const item: Record<string, unknown> = { text: '', visible: false };
        item.show = () => (item.visible = true);
        item.hide = () => (item.visible = false);
        item.dispose = () => undefined;
        statusBarItems.push(item);
        return item;
      },
    },
    commands: {
      registerCommand: (id: string, fn: (...args: unknown[]) => unknown) => {
        if (commands.has(id)) {
          throw new Error(`command ${id} registered twice`);
        }
        commands.set(id, fn);
        return new Disposable(() => commands.delete(id));
      },
      executeCommand: (command: string, ...args: unknown[]) => {
        executed.push({ command, args });
        const fn = commands.get(command);
        return Promise.resolve(fn ? fn(...args) : undefined);
      },
    },
    workspace: {
      getConfiguration: (section: string) => ({
        inspect: (key: string) => {
          const full = `${section}.${key}`;
          return settings.has(full) ? { key: full, globalValue: settings.get(full) } : { key: full };
        },
        get: (key: string) => settings.get(`${section}.${key}`),
        update: (key: string, value: unknown) => {
          settings.set(`${section}.${key}`, value);
          configListeners.fire({ affectsConfiguration: (s: string) => `${section}.${key}`.startsWith(s) });
          return Promise.resolve();
        },
      }),
      onDidChangeConfiguration: configListeners.event,
    },
  };

  // vscode-languageclient subclasses a few vscode classes (CompletionItem, CodeLens, ...)
  // when it loads; anything not modelled above is an empty class, enough to load it.
  const placeholders = new Map<string | symbol, unknown>();
  const proxied = new Proxy(vscode as Record<string | symbol, unknown>, {
    get(target, key) {
      if (key in target) {
        return target[key];
      }
      if (typeof key === 'string' && /^[A-Z]/.test(key)) {
        if (!placeholders.has(key)) {
          placeholders.set(key, class {});
        }
        return placeholders.get(key);
      }
      return undefined;
    },
  });

  return {
    vscode: proxied as typeof vscode,
    shown,
    commands,
    executed,
    settings,
    statusBarItems,
    output,
    answerWith(fn: (message: Shown) => string | undefined) {
      answer = fn;
    },
  };
}

export type VscodeStub = ReturnType<typeof createVscodeStub>;

let installed: VscodeStub | undefined;

/** Make `require('vscode')` return a fresh stub; returns it. */
export function installVscodeStub(): VscodeStub {
  installed = createVscodeStub();
  const anyModule = Module as unknown as {
    _resolveFilename: (request: string, ...rest: unknown[]) => string;
    _cache: Record<string, unknown>;
  };
  if (!(anyModule as { __parafillHooked?: boolean }).__parafillHooked) {
    const original = anyModule._resolveFilename;
    anyModule._resolveFilename = function (request: string, ...rest: unknown[]) {
      if (request === 'vscode') {
        return 'vscode';
      }
      return original.call(this, request, ...rest);
    };
    (anyModule as { __parafillHooked?: boolean }).__parafillHooked = true;
  }
  const cache = require.cache as Record<string, unknown>;
  cache['vscode'] = { id: 'vscode', filename: 'vscode', loaded: true, exports: installed.vscode };
  return installed;
}
