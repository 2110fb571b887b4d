/**
 * The controller against a fake editor host and a fake language client: what the
 * user sees (notifications, status bar) and what goes to the server, for the
 * happy path and for bad input (missing server, crashes, wrong-typed settings).
 */
import assert = require('node:assert/strict');
import { describe, it } from 'node:test';

import { ClientHooks, Controller, Host, LanguageClientLike } from '../src/controller';
import { Notice } from '../src/notifier';
import { ServerCommand } from '../src/serverCommand';

class FakeClient implements LanguageClientLike {
  started = 0;
  stopped = 0;
  notifications: { method: string; params: unknown }[] = [];
  requests: string[] = [];
  status: unknown = { model: 'tiny', device: 'cpu', state: 'ready', latency: { p50: 12, p90: 20, p99: 30 } };
  failStart: Error | undefined;
  listeners: ((running: boolean) => void)[] = [];
  constructor(readonly command: ServerCommand, readonly hooks: ClientHooks) {}
  async start() {
    this.started++;
    if (this.failStart) {
      throw this.failStart;
    }
    this.listeners.forEach((l) => l(true));
  }
  async stop() {
    this.stopped++;
  }
  async sendRequest<R>(method: string): Promise<R> {
    this.requests.push(method);
    return this.status as R;
  }
  async sendNotification(method: string, params?: unknown) {
    this.notifications.push({ method, params });
  }
  onRunningChanged(listener: (running: boolean) => void) {
    this.listeners.push(listener);
  }
}

function setup(
  options: { settings?: Record<string, unknown>; executables?: string[]; answer?: string; failStart?: Error } = {},
) {
  const settings = new Map(Object.entries(options.settings ?? {}));
  const executables = new Set(options.executables ?? ['/usr/bin/parafill']);
  const notices: Notice[] = [];
  const opened: string[] = [];
  const clients: FakeClient[] = [];
  let clock = 1000;
  const host: Host = {
    showNotice: (n) => (notices.push(n), Promise.resolve(options.answer)),
    showInfo: (message, actions) => (notices.push({ message, actions, severity: 'info' }), Promise.resolve(undefined)),
    openSettings: (s) => opened.push(s),
    showOutput: () => undefined,
    getSetting: (k) => settings.get(k),
    updateSetting: (k, v) => (settings.set(k, v), Promise.resolve()),
    statusBar: { text: '', tooltip: '', show: () => undefined },
    environment: {
      platform: 'linux',
      env: { PATH: '/usr/bin' },
      isExecutable: (f) => executables.has(f),
    },
    now: () => clock,
    log: () => undefined,
  };
  const controller = new Controller(host, (command, hooks) => {
    const client = new FakeClient(command, hooks);
    client.failStart = options.failStart;
    clients.push(client);
    return client;
  });
  return {
    controller, host, notices, opened, clients, settings, executables,
    tick: (ms: number) => (clock += ms),
  };
}

const flush = () => new Promise((r) => setImmediate(r));

describe('controller', () => {
  it('starts the server with the user settings as initializationOptions and shows the status', async () => {
    const t = setup({ settings: { steps: 4, debounceMs: 'fast' } });
    await t.controller.start();
    assert.equal(t.clients.length, 1);
    assert.equal(t.clients[0].command.command, '/usr/bin/parafill');
    assert.deepEqual(t.clients[0].hooks.initializationOptions, { parafill: { steps: 4 } });
    assert.equal(t.controller.state, 'running');
    assert.deepEqual(t.clients[0].requests, ['parafill/status']);
    assert.match(String(t.host.statusBar.tooltip), /tiny on cpu \(ready\)/);
    // The bad debounceMs was named once, as a warning with a fix.
    assert.equal(t.notices.length, 1);
    assert.equal(t.notices[0].severity, 'warning');
    assert.match(t.notices[0].message, /"parafill\.debounceMs" must be a whole number/);
    assert.deepEqual(t.notices[0].actions, ['Open Settings']);
  });

  it('says once that the server is missing, however often it is retried, and starts once fixed', async () => {
    const t = setup({ executables: [], answer: 'Open Settings' });
    for (let i = 0; i < 5; i++) {
      await t.controller.start();
      await t.controller.onConfigurationChanged();
    }
    await flush();
    assert.equal(t.clients.length, 0);
    assert.equal(t.notices.length, 1);
    assert.equal(t.notices[0].severity, 'error');
    assert.match(t.notices[0].message, /not found on PATH.*pipx install \/path\/to\/parafill/);
    assert.deepEqual(t.opened, ['parafill.pythonPath'], 'the fix action opens the setting');
    assert.equal(t.controller.state, 'failed');
    assert.match(t.host.statusBar.text, /warning/);

    t.executables.add('/opt/py/bin/python');
    t.settings.set('pythonPath', '/opt/py/bin/python');
    await t.controller.onConfigurationChanged();
    assert.equal(t.clients.length, 1);
    assert.equal(t.clients[0].command.command, '/opt/py/bin/python');
    assert.deepEqual(t.clients[0].command.args, ['-m', 'lsp_server', 'serve']);
    assert.equal(t.controller.state, 'running');
  });

  it('restarts a crashing server quietly, then stops it with one notification', async () => {
    const t = setup();
    await t.controller.start();
    const hooks = t.clients[0].hooks;
    assert.deepEqual([1, 2, 3].map(() => (t.tick(100), hooks.closed())), ['restart', 'restart', 'restart']);
    assert.equal(t.notices.length, 0);
    t.tick(100);
    assert.equal(hooks.closed(), 'stop');
    assert.equal(t.notices.length, 1);
    assert.match(t.notices[0].message, /crashed 4 times/);
    assert.deepEqual(t.notices[0].actions, ['Show Output', 'Restart Server']);
    assert.equal(t.controller.state, 'failed');

    // A deliberate restart starts a new process and counts crashes afresh.
    await t.controller.restart();
    assert.equal(t.clients.length, 2);
    assert.equal(t.clients[1].hooks.closed(), 'restart');
  });

  it('reports a server that does not start, and keeps quiet on repeated starts', async () => {
    const t = setup({ failStart: new Error('spawn EACCES') });
    await t.controller.start();
    await t.controller.start();
    await t.controller.onConfigurationChanged();
    assert.equal(t.clients.length, 2, 'each start tries again');
    const failures = t.notices.filter((n) => /did not start: spawn EACCES/.test(n.message));
    assert.equal(failures.length, 1);
    assert.equal(t.controller.state, 'failed');
  });

  it('gates inline completions on the enable switch and shows the last latency', async () => {
    const t = setup();
    await t.controller.start();
    const hooks = t.clients[0].hooks;
    let calls = 0;
    const next = () => {
      calls++;
      t.tick(42);
      return { items: [{ insertText: 'x' }] };
    };
    assert.deepEqual(await hooks.inlineCompletion(() => false, next), { items: [{ insertText: 'x' }] });
    assert.equal(t.host.statusBar.text, '$(sparkle) parafill 42 ms');

    await t.controller.toggle();
    assert.equal(t.settings.get('enable'), false, 'the toggle is saved in the settings');
    assert.equal(t.host.statusBar.text, '$(circle-slash) parafill');
    assert.equal(await hooks.inlineCompletion(() => false, next), null);
    assert.equal(calls, 1, 'disabled: the server is not asked');

    await t.controller.setEnabled(true);
    await t.controller.onConfigurationChanged();
    assert.ok(await hooks.inlineCompletion(() => false, next));
    assert.equal(calls, 2);
  });

  it('offers the completion-menu fallback only when asked to', async () => {
    const t = setup();
    await t.controller.start();
    const hooks = t.clients[0].hooks;
    assert.equal(await hooks.completion(() => ['item']), null);
    t.settings.set('completionMenu', true);
    await t.controller.onConfigurationChanged();
    assert.deepEqual(await hooks.completion(() => ['item']), ['item']);
  });

  it('passes setting changes to the running server, and restarts for a new command', async () => {
    const t = setup();
    await t.controller.start();
    t.settings.set('steps', 2);
    await t.controller.onConfigurationChanged();
    assert.deepEqual(t.clients[0].notifications, [
      { method: 'workspace/didChangeConfiguration', params: { settings: { parafill: { steps: 2 } } } },
    ]);
    assert.equal(t.clients.length, 1);

    t.executables.add('/usr/bin/other');
    t.settings.set('serverCommand', ['/usr/bin/other', 'serve']);
    await t.controller.onConfigurationChanged();
    assert.equal(t.clients[0].stopped, 1);
    assert.equal(t.clients.length, 2);
    assert.equal(t.clients[1].command.command, '/usr/bin/other');
  });
});
