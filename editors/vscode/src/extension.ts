/**
 * Entry point: wires the real `vscode` API and `vscode-languageclient` to the
 * Controller. Only glue lives here; behaviour lives in controller.ts and the
 * pure modules, which the unit tests exercise.
 *
 * Inline completions: vscode-languageclient registers VS Code's
 * InlineCompletionItemProvider from the server's `inlineCompletionProvider`
 * capability (LSP 3.18 `textDocument/inlineCompletion`); the middleware below
 * only gates it on `parafill.enable` and times it.
 */
import * as fs from 'node:fs';

import * as vscode from 'vscode';
import {
  CloseAction,
  ErrorAction,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
  TransportKind,
} from 'vscode-languageclient/node';

import { ClientFactory, Controller, Host } from './controller';
import { Environment } from './serverCommand';

export const COMMANDS = {
  enable: 'parafill.enable',
  disable: 'parafill.disable',
  toggle: 'parafill.toggle',
  showStatus: 'parafill.showStatus',
  restartServer: 'parafill.restartServer',
} as const;

const STATUS_REFRESH_MS = 3000;

let controller: Controller | undefined;

function isExecutable(file: string): boolean {
  try {
    const stat = fs.statSync(file);
    if (!stat.isFile()) {
      return false;
    }
    if (process.platform === 'win32') {
      return true;
    }
    fs.accessSync(file, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

export function makeHost(output: vscode.LogOutputChannel, statusBar: vscode.StatusBarItem): Host {
  const environment: Environment = { platform: process.platform, env: process.env, isExecutable };
  return {
    showNotice: (notice) => {
      const show =
        notice.severity === 'error'
          ? vscode.window.showErrorMessage
          : notice.severity === 'warning'
            ? vscode.window.showWarningMessage
            : vscode.window.showInformationMessage;
      return show(notice.message, ...notice.actions);
    },
    showInfo: (message, actions) => vscode.window.showInformationMessage(message, ...actions),
    openSettings: (setting) => {
      void vscode.commands.executeCommand('workbench.action.openSettings', setting);
    },
    showOutput: () => output.show(true),
    getSetting: (key) => {
      // Only values the user set: the server owns the defaults of its settings.
      const inspected = vscode.workspace.getConfiguration('parafill').inspect(key);
      return inspected?.workspaceFolderValue ?? inspected?.workspaceValue ?? inspected?.globalValue;
    },
    updateSetting: (key, value) =>
      vscode.workspace.getConfiguration('parafill').update(key, value, vscode.ConfigurationTarget.Global),
    statusBar,
    environment,
    now: () => Date.now(),
    log: (message) => output.info(message),
  };
}

export function makeClientFactory(output: vscode.LogOutputChannel): ClientFactory {
  return (command, hooks) => {
    const serverOptions: ServerOptions = {
      command: command.command,
      args: command.args,
      transport: TransportKind.stdio,
    };
    const clientOptions: LanguageClientOptions = {
      documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
      outputChannel: output,
      initializationOptions: hooks.initializationOptions,
      middleware: {
        provideInlineCompletionItems: (document, position, context, token, next) =>
          hooks.inlineCompletion(
            () => token.isCancellationRequested,
            () => next(document, position, context, token),
          ),
        provideCompletionItem: (document, position, context, token, next) =>
          hooks.completion(() => next(document, position, context, token)),
      },
      errorHandler: {
        error: () => ({ action: ErrorAction.Continue }),
        closed: () => {
          const decision = hooks.closed();
          // `handled`: the controller has told the user (once); no second message.
          return decision === 'restart'
            ? { action: CloseAction.Restart, handled: true }
            : { action: CloseAction.DoNotRestart, handled: true };
        },
      },
      initializationFailedHandler: (error) => {
        hooks.initializationFailed(error);
        return false;
      },
    };
    const client = new LanguageClient('parafill', 'parafill', serverOptions, clientOptions);
    return {
      start: () => client.start(),
      stop: () => client.stop(),
      sendRequest: (method, params) => client.sendRequest(method, params),
      sendNotification: (method, params) => client.sendNotification(method, params),
      onRunningChanged: (listener) => {
        client.onDidChangeState((event) => listener(event.newState === State.Running));
      },
    };
  };
}

export async function activate(context: vscode.ExtensionContext): Promise<Controller> {
  const output = vscode.window.createOutputChannel('parafill', { log: true });
  const statusBar = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  context.subscriptions.push(output, statusBar);

  const ctl = new Controller(makeHost(output, statusBar), makeClientFactory(output));
  controller = ctl;
  context.subscriptions.push(
    vscode.commands.registerCommand(COMMANDS.enable, () => ctl.setEnabled(true)),
    vscode.commands.registerCommand(COMMANDS.disable, () => ctl.setEnabled(false)),
    vscode.commands.registerCommand(COMMANDS.toggle, () => ctl.toggle()),
    vscode.commands.registerCommand(COMMANDS.showStatus, () => ctl.showStatus()),
    vscode.commands.registerCommand(COMMANDS.restartServer, () => ctl.restart()),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration('parafill')) {
        void ctl.onConfigurationChanged();
      }
    }),
  );
  const timer = setInterval(() => void ctl.refreshStatus(), STATUS_REFRESH_MS);
  context.subscriptions.push({ dispose: () => clearInterval(timer) });
  await ctl.start();
  return ctl;
}

export async function deactivate(): Promise<void> {
  const ctl = controller;
  controller = undefined;
  await ctl?.stop();
}
