/**
 * The extension's behaviour: start and restart the server, pass settings on,
 * gate inline completions on the enable switch, keep the status bar current,
 * and report problems (missing server, crashes, bad settings) once each.
 *
 * It talks to VS Code and to the language client only through the small `Host`
 * and `LanguageClientLike` interfaces, so the tests drive it with fakes of the
 * editor while the logic under test is this real code. extension.ts wires it to
 * the real `vscode` API and `vscode-languageclient`.
 */
import { CrashPolicy } from './crashPolicy';
import { Notice, OnceNotifier } from './notifier';
import { Environment, isProblem, resolveServerCommand, ServerCommand } from './serverCommand';
import { ClientSettings, resolveSettings, RESTART_KEYS, ResolvedSettings } from './settings';
import { ClientState, ServerStatus, statusText } from './statusText';

export const STATUS_REQUEST = 'parafill/status';

export interface StatusBarLike {
  text: string;
  tooltip?: unknown;
  command?: unknown;
  show(): void;
}

export interface Host {
  showNotice(notice: Notice): PromiseLike<string | undefined>;
  showInfo(message: string, actions: string[]): PromiseLike<string | undefined>;
  openSettings(setting: string): void;
  showOutput(): void;
  /** The value the user set for `parafill.<key>`, or undefined when unset. */
  getSetting(key: string): unknown;
  updateSetting(key: string, value: unknown): PromiseLike<void>;
  statusBar: StatusBarLike;
  environment: Environment;
  now(): number;
  log(message: string): void;
}

export interface LanguageClientLike {
  start(): Promise<void>;
  stop(): Promise<void>;
  sendRequest<R>(method: string, params?: unknown): Promise<R>;
  sendNotification(method: string, params?: unknown): Promise<void>;
  /** Called with true whenever the client (re)reaches its running state, false when it stops. */
  onRunningChanged(listener: (running: boolean) => void): void;
}

/** What the language client asks the controller when its process fails. */
export interface ClientHooks {
  initializationOptions: { parafill: Record<string, unknown> };
  /** Gate and time an inline completion request; `next` runs it. */
  inlineCompletion<T>(isCancelled: () => boolean, next: () => PromiseLike<T> | T): Promise<T | null>;
  /** Gate the completion-menu fallback. */
  completion<T>(next: () => PromiseLike<T> | T): Promise<T | null>;
  /** The connection to the server closed unexpectedly: restart it or not. */
  closed(): 'restart' | 'stop';
  /** The server failed to initialize; never retried automatically. */
  initializationFailed(error: unknown): void;
}

export type ClientFactory = (command: ServerCommand, hooks: ClientHooks) => LanguageClientLike;

export const ACTION_OPEN_SETTINGS = 'Open Settings';
export const ACTION_SHOW_OUTPUT = 'Show Output';
export const ACTION_RESTART = 'Restart Server';

export class Controller {
  private settings: ResolvedSettings;
  private client: LanguageClientLike | undefined;
  private clientState: ClientState = 'stopped';
  private status: ServerStatus | undefined;
  private lastLatencyMs: number | undefined;
  private problem: string | undefined;
  private statusInFlight = false;
  private readonly crashes = new CrashPolicy();
  readonly notifier: OnceNotifier;

  constructor(
    private readonly host: Host,
    private readonly createClient: ClientFactory,
  ) {
    this.notifier = new OnceNotifier((notice) => host.showNotice(notice), (key, action) =>
      this.onAction(key, action),
    );
    this.settings = this.readSettings();
    host.statusBar.command = 'parafill.toggle';
    host.statusBar.show();
    this.render();
  }

  get enabled(): boolean {
    return this.settings.client.enable;
  }

  get state(): ClientState {
    return this.clientState;
  }

  get serverStatus(): ServerStatus | undefined {
    return this.status;
  }

  private readSettings(): ResolvedSettings {
    const settings = resolveSettings((key) => this.host.getSetting(key));
    if (settings.problems.length > 0) {
      this.notifier.notify('settings', {
        message: `parafill: ${settings.problems.join(' ')}`,
        actions: [ACTION_OPEN_SETTINGS],
        severity: 'warning',
      });
    } else {
      this.notifier.clear('settings');
    }
    return settings;
  }

  /** Start the server if it can be found; otherwise say what to fix, once. */
  async start(): Promise<void> {
    if (this.client) {
      return;
    }
    const resolved = resolveServerCommand(this.settings.client, this.host.environment);
    if (isProblem(resolved)) {
      this.fail('command', `parafill: ${resolved.message}`, [ACTION_OPEN_SETTINGS], resolved.setting);
      return;
    }
    this.problem = undefined;
    this.host.log(`starting ${[resolved.command, ...resolved.args].join(' ')}`);
    const client = this.createClient(resolved, this.hooks());
    this.client = client;
    client.onRunningChanged((running) => {
      // Also fires after the client restarts itself following a crash.
      if (this.client === client && running && this.clientState !== 'running') {
        this.clientState = 'running';
        this.problem = undefined;
        this.render();
        void this.refreshStatus();
      }
    });
    this.clientState = 'starting';
    this.render();
    try {
      await client.start();
    } catch (error) {
      if (this.client === client) {
        this.client = undefined;
      }
      this.fail('start', `parafill: the server did not start: ${message(error)}`, [
        ACTION_SHOW_OUTPUT,
        ACTION_OPEN_SETTINGS,
      ]);
      return;
    }
    if (this.client !== client) {
      return; // stopped or restarted while starting
    }
    if ((this.clientState as ClientState) !== 'running') {
      // The running-state event (which refreshes the status) did not come first.
      this.clientState = 'running';
      this.render();
      await this.refreshStatus();
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.clientState = 'stopped';
    this.status = undefined;
    if (client) {
      try {
        await client.stop();
      } catch (error) {
        this.host.log(`stopping the server: ${message(error)}`);
      }
    }
    this.render();
  }

  /** A deliberate restart: forget past problems and crashes, start afresh. */
  async restart(): Promise<void> {
    this.notifier.clear();
    this.crashes.reset();
    this.problem = undefined;
    await this.stop();
    this.settings = this.readSettings();
    await this.start();
  }

  async setEnabled(enable: boolean): Promise<void> {
    // Written to the user's settings so the choice survives a reload and shows in the UI;
    // onConfigurationChanged picks it up.
    this.settings.client.enable = enable;
    this.render();
    await this.host.updateSetting('enable', enable);
  }

  toggle(): Promise<void> {
    return this.setEnabled(!this.enabled);
  }

  /** Settings changed: restart for a new command, otherwise tell the running server. */
  async onConfigurationChanged(): Promise<void> {
    const before = this.settings;
    this.settings = this.readSettings();
    const needsRestart = RESTART_KEYS.some(
      (key) =>
        JSON.stringify(before.client[key as keyof ClientSettings]) !==
        JSON.stringify(this.settings.client[key as keyof ClientSettings]),
    );
    if (needsRestart) {
      await this.restart();
      return;
    }
    if (this.client && this.clientState === 'running') {
      await this.client.sendNotification('workspace/didChangeConfiguration', {
        settings: { parafill: this.settings.server },
      });
    }
    this.render();
  }

  /** Ask the server for `parafill/status`; a failure only marks the status unknown. */
  async refreshStatus(): Promise<ServerStatus | undefined> {
    const client = this.client;
    if (!client || this.clientState !== 'running' || this.statusInFlight) {
      return this.status;
    }
    this.statusInFlight = true;
    try {
      this.status = await client.sendRequest<ServerStatus>(STATUS_REQUEST);
    } catch (error) {
      this.host.log(`${STATUS_REQUEST} failed: ${message(error)}`);
      this.status = undefined;
    } finally {
      this.statusInFlight = false;
    }
    this.render();
    return this.status;
  }

  /** The Show Status command: everything the status bar knows, plus actions. */
  async showStatus(): Promise<void> {
    await this.refreshStatus();
    const { tooltip } = statusText(this.statusInput());
    const choice = await this.host.showInfo(tooltip.split('\n').join(' · '), [
      ACTION_RESTART,
      ACTION_SHOW_OUTPUT,
    ]);
    if (choice !== undefined) {
      this.onAction('status', choice);
    }
  }

  private hooks(): ClientHooks {
    return {
      initializationOptions: { parafill: this.settings.server },
      inlineCompletion: async (isCancelled, next) => {
        if (!this.enabled) {
          return null;
        }
        const started = this.host.now();
        const result = await next();
        if (!isCancelled()) {
          this.lastLatencyMs = this.host.now() - started;
          this.render();
        }
        return result;
      },
      completion: async (next) => {
        if (!this.enabled || !this.settings.client.completionMenu) {
          return null;
        }
        return next();
      },
      closed: () => {
        const decision = this.crashes.onCrash(this.host.now());
        if (decision === 'restart') {
          this.host.log(`the server stopped; restarting (${this.crashes.recentCrashes} recent crashes)`);
          this.clientState = 'starting';
          this.render();
          return 'restart';
        }
        this.client = undefined;
        this.fail(
          'crash',
          `parafill: the server crashed ${this.crashes.recentCrashes} times in a few minutes and was ` +
            'stopped. See the output for its error, fix the cause, then restart it.',
          [ACTION_SHOW_OUTPUT, ACTION_RESTART],
        );
        return 'stop';
      },
      initializationFailed: (error) => {
        this.client = undefined;
        this.fail('initialize', `parafill: the server failed to initialize: ${message(error)}`, [
          ACTION_SHOW_OUTPUT,
          ACTION_RESTART,
        ]);
      },
    };
  }

  private fail(key: string, text: string, actions: string[], setting?: string): void {
    this.clientState = 'failed';
    this.problem = text.replace(/^parafill: /, '');
    this.failedSetting = setting;
    this.notifier.notify(key, { message: text, actions, severity: 'error' });
    this.render();
  }

  private failedSetting: string | undefined;

  private onAction(key: string, action: string): void {
    switch (action) {
      case ACTION_OPEN_SETTINGS:
        this.host.openSettings(key === 'settings' || !this.failedSetting ? 'parafill' : this.failedSetting);
        break;
      case ACTION_SHOW_OUTPUT:
        this.host.showOutput();
        break;
      case ACTION_RESTART:
        void this.restart();
        break;
    }
  }

  private statusInput() {
    return {
      enabled: this.enabled,
      client: this.clientState,
      status: this.status,
      lastLatencyMs: this.lastLatencyMs,
      problem: this.problem,
    };
  }

  private render(): void {
    const { text, tooltip } = statusText(this.statusInput());
    this.host.statusBar.text = text;
    this.host.statusBar.tooltip = tooltip;
  }
}

function message(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  if (typeof error === 'object' && error !== null && 'message' in error) {
    return String((error as { message: unknown }).message);
  }
  return String(error);
}
