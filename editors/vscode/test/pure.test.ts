/** Tests of the pure modules: settings, server command, notifier, crash policy, status text. */
import assert = require('node:assert/strict');
import fs = require('node:fs');
import os = require('node:os');
import path = require('node:path');
import { describe, it } from 'node:test';

import { CrashPolicy } from '../src/crashPolicy';
import { OnceNotifier, Notice } from '../src/notifier';
import { findExecutable, isProblem, resolveServerCommand } from '../src/serverCommand';
import { resolveSettings, SETTINGS } from '../src/settings';
import { statusText } from '../src/statusText';

const packageJson = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8'));

function realEnvironment(dirs: string[]) {
  return {
    platform: 'linux' as NodeJS.Platform,
    env: { PATH: dirs.join(':') },
    isExecutable: (file: string) => {
      try {
        fs.accessSync(file, fs.constants.X_OK);
        return fs.statSync(file).isFile();
      } catch {
        return false;
      }
    },
  };
}

function tempDirWith(files: Record<string, number>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parafill-vscode-'));
  for (const [name, mode] of Object.entries(files)) {
    fs.writeFileSync(path.join(dir, name), '#!/bin/sh\n');
    fs.chmodSync(path.join(dir, name), mode);
  }
  return dir;
}

describe('settings', () => {
  it('package.json contributes exactly the settings the extension reads, with matching types', () => {
    const properties = packageJson.contributes.configuration.properties;
    const contributed = Object.keys(properties).map((k) => k.replace(/^parafill\./, '')).sort();
    assert.deepEqual(contributed, SETTINGS.map((s) => s.key).sort());
    for (const spec of SETTINGS) {
      const prop = properties[`parafill.${spec.key}`];
      const expected = spec.type === 'string[]' ? 'array' : spec.type;
      assert.equal(prop.type, expected, spec.key);
      if (spec.enum) {
        assert.deepEqual(prop.enum, spec.enum);
      }
      assert.equal(prop.minimum, spec.minimum, `${spec.key} minimum`);
      assert.equal(prop.maximum, spec.maximum, `${spec.key} maximum`);
      assert.equal(prop.exclusiveMinimum, spec.exclusiveMinimum, `${spec.key} exclusiveMinimum`);
    }
  });

  it('sends only user-set server settings, camelCase, and keeps client settings apart', () => {
    const values: Record<string, unknown> = { steps: 4, device: 'cuda', enable: false, pythonPath: '/py' };
    const resolved = resolveSettings((k) => values[k]);
    assert.deepEqual(resolved.server, { steps: 4, device: 'cuda' });
    assert.equal(resolved.client.enable, false);
    assert.equal(resolved.client.pythonPath, '/py');
    assert.deepEqual(resolved.problems, []);
  });

  it('drops wrong-typed values and names each one', () => {
    const values: Record<string, unknown> = {
      steps: 'eight', device: 'tpu', confidenceThreshold: 0, contextTokens: 10.5,
      enabledLanguages: ['python', 3], serverCommand: 'parafill serve', debounceMs: 20,
    };
    const resolved = resolveSettings((k) => values[k]);
    assert.deepEqual(resolved.server, { debounceMs: 20 });
    assert.deepEqual(resolved.client.serverCommand, []);
    const text = resolved.problems.join('\n');
    for (const key of ['steps', 'device', 'confidenceThreshold', 'contextTokens', 'enabledLanguages', 'serverCommand']) {
      assert.match(text, new RegExp(`"parafill\\.${key}" must be`), key);
    }
    assert.equal(resolved.problems.length, 6);
    assert.match(text, /one of "auto", "cpu", "cuda"/);
  });
});

describe('server command', () => {
  const settings = { enable: true, completionMenu: false, serverCommand: [] as string[], pythonPath: '' };

  it('finds `parafill serve` on PATH by default', () => {
    const dir = tempDirWith({ parafill: 0o755 });
    const resolved = resolveServerCommand(settings, realEnvironment(['/nonexistent', dir]));
    assert.ok(!isProblem(resolved));
    assert.equal(resolved.command, path.join(dir, 'parafill'));
    assert.deepEqual(resolved.args, ['serve']);
  });

  it('prefers serverCommand, then pythonPath', () => {
    const dir = tempDirWith({ python3: 0o755, myserver: 0o755 });
    const env = realEnvironment([dir]);
    const fromPython = resolveServerCommand({ ...settings, pythonPath: path.join(dir, 'python3') }, env);
    assert.ok(!isProblem(fromPython));
    assert.deepEqual(fromPython.args, ['-m', 'lsp_server', 'serve']);
    const fromCommand = resolveServerCommand(
      { ...settings, pythonPath: path.join(dir, 'python3'), serverCommand: ['myserver', 'serve', '--device', 'cpu'] },
      env,
    );
    assert.ok(!isProblem(fromCommand));
    assert.equal(fromCommand.command, path.join(dir, 'myserver'));
    assert.deepEqual(fromCommand.args, ['serve', '--device', 'cpu']);
  });

  it('reports a missing or non-executable server with the setting to fix', () => {
    const dir = tempDirWith({ parafill: 0o644 });
    const missing = resolveServerCommand(settings, realEnvironment([dir]));
    assert.ok(isProblem(missing));
    assert.equal(missing.setting, 'parafill.pythonPath');
    assert.match(missing.message, /pipx install \/path\/to\/parafill/);
    const badPython = resolveServerCommand({ ...settings, pythonPath: '/no/such/python' }, realEnvironment([dir]));
    assert.ok(isProblem(badPython));
    assert.equal(badPython.setting, 'parafill.pythonPath');
    assert.match(badPython.message, /\/no\/such\/python/);
    const empty = resolveServerCommand({ ...settings, serverCommand: [''] }, realEnvironment([dir]));
    assert.ok(isProblem(empty));
    assert.equal(empty.setting, 'parafill.serverCommand');
  });

  it('uses PATHEXT on Windows', () => {
    const seen: string[] = [];
    const found = findExecutable('parafill', {
      platform: 'win32',
      env: { PATH: 'C:\\bin;D:\\tools', PATHEXT: '.EXE;.CMD' },
      isExecutable: (f) => {
        seen.push(f);
        return f.endsWith('tools/parafill.CMD') || f.endsWith('tools\\parafill.CMD');
      },
    });
    assert.ok(found && /parafill\.CMD$/.test(found), String(found));
    assert.ok(seen.some((f) => /parafill\.EXE$/.test(f)));
  });
});

describe('notifier and crash policy', () => {
  it('shows a problem once until it is cleared or changes', async () => {
    const shown: Notice[] = [];
    const notifier = new OnceNotifier((n) => (shown.push(n), Promise.resolve(undefined)), () => undefined);
    const notice: Notice = { message: 'server missing', actions: ['Open Settings'], severity: 'error' };
    assert.equal(notifier.notify('command', notice), true);
    for (let i = 0; i < 10; i++) {
      assert.equal(notifier.notify('command', notice), false);
    }
    assert.equal(notifier.notify('command', { ...notice, message: 'other' }), true);
    notifier.clear('command');
    assert.equal(notifier.notify('command', { ...notice, message: 'other' }), true);
    assert.equal(shown.length, 3);
  });

  it('passes the chosen action on', async () => {
    const actions: string[] = [];
    const notifier = new OnceNotifier(() => Promise.resolve('Restart Server'), (key, a) => actions.push(`${key}:${a}`));
    notifier.notify('crash', { message: 'x', actions: ['Restart Server'], severity: 'error' });
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(actions, ['crash:Restart Server']);
  });

  it('restarts a few times, then gives up; old crashes age out', () => {
    const policy = new CrashPolicy(3, 1000);
    assert.deepEqual([0, 10, 20].map((t) => policy.onCrash(t)), ['restart', 'restart', 'restart']);
    assert.equal(policy.onCrash(30), 'give-up');
    const aged = new CrashPolicy(3, 1000);
    assert.deepEqual([0, 600, 1200, 1800, 2400].map((t) => aged.onCrash(t)), Array(5).fill('restart'));
  });
});

describe('status text', () => {
  it('shows latency when on, a slash when off, a warning on a problem', () => {
    const status = { model: '/models/parafill-small', device: 'cuda:0', state: 'ready', latency: { p50: 41.2, p90: 80, p99: 120 }, cacheHitRate: 0.25 };
    const on = statusText({ enabled: true, client: 'running', status, lastLatencyMs: 37.6 });
    assert.equal(on.text, '$(sparkle) parafill 38 ms');
    assert.match(on.tooltip, /parafill-small on cuda:0 \(ready\)/);
    assert.match(on.tooltip, /p50 41 ms, p90 80 ms, p99 120 ms/);
    assert.match(on.tooltip, /Cache hit rate 25%/);
    assert.equal(statusText({ enabled: false, client: 'running', status }).text, '$(circle-slash) parafill');
    const failed = statusText({ enabled: true, client: 'failed', problem: 'server missing' });
    assert.equal(failed.text, '$(warning) parafill');
    assert.match(failed.tooltip, /server missing/);
    assert.match(statusText({ enabled: true, client: 'running', status: { ...status, state: 'loading' } }).text, /loading~spin/);
  });
});
