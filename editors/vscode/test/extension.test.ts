/**
 * The real extension entry point loaded against the stubbed `vscode` module:
 * commands from package.json are registered, the status bar item toggles, and a
 * missing server gives one error with a fix instead of a stream of messages.
 */
import assert = require('node:assert/strict');
import fs = require('node:fs');
import path = require('node:path');
import { describe, it } from 'node:test';

import { installVscodeStub } from './vscodeStub';

const stub = installVscodeStub();
// Loaded after the stub, so its `require('vscode')` and vscode-languageclient's see it.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const extension = require('../src/extension') as typeof import('../src/extension');

const packageJson = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8'));

describe('extension', () => {
  it('activates, registers every contributed command, and reports a missing server once', async () => {
    const savedPath = process.env.PATH;
    process.env.PATH = '/nonexistent-dir-for-parafill-test';
    const subscriptions: { dispose(): unknown }[] = [];
    try {
      stub.answerWith(() => 'Open Settings');
      const controller = await extension.activate({ subscriptions } as never);
      const contributed = packageJson.contributes.commands.map((c: { command: string }) => c.command).sort();
      assert.deepEqual([...stub.commands.keys()].sort(), contributed);
      assert.deepEqual(Object.values(extension.COMMANDS).sort(), contributed);

      const item = stub.statusBarItems[0];
      assert.equal(item.visible, true);
      assert.equal(item.command, 'parafill.toggle');
      assert.match(String(item.text), /warning/);

      await stub.vscode.commands.executeCommand('parafill.restartServer');
      await stub.vscode.commands.executeCommand('parafill.restartServer');
      await new Promise((r) => setImmediate(r));
      const errors = stub.shown.filter((m) => m.severity === 'error');
      // One per deliberate try (activate + 2 restarts), never more: restarting is the
      // user asking again. Activation alone showed exactly one.
      assert.equal(errors.length, 3);
      assert.match(errors[0].message, /not found on PATH/);
      assert.ok(stub.executed.some((e) => e.command === 'workbench.action.openSettings'));

      // The status bar click (toggle) writes the setting and updates the item.
      await stub.vscode.commands.executeCommand('parafill.toggle');
      assert.equal(stub.settings.get('parafill.enable'), false);
      assert.equal(controller.enabled, false);
      await stub.vscode.commands.executeCommand('parafill.enable');
      assert.equal(stub.settings.get('parafill.enable'), true);
    } finally {
      process.env.PATH = savedPath;
      subscriptions.forEach((s) => s.dispose());
      await extension.deactivate();
    }
  });

  it('a wrong-typed setting is named once across repeated configuration changes', async () => {
    stub.shown.length = 0;
    stub.settings.set('parafill.steps', 'many');
    const subscriptions: { dispose(): unknown }[] = [];
    const savedPath = process.env.PATH;
    process.env.PATH = '/nonexistent-dir-for-parafill-test';
    try {
      await extension.activate({ subscriptions } as never);
      for (let i = 0; i < 3; i++) {
        await stub.vscode.workspace.getConfiguration('parafill').update('maxSnippets', i);
      }
      await new Promise((r) => setImmediate(r));
      const warnings = stub.shown.filter((m) => m.severity === 'warning');
      assert.equal(warnings.length, 1);
      assert.match(warnings[0].message, /"parafill\.steps" must be a whole number/);
    } finally {
      process.env.PATH = savedPath;
      subscriptions.forEach((s) => s.dispose());
      stub.settings.delete('parafill.steps');
      await extension.deactivate();
    }
  });
});
