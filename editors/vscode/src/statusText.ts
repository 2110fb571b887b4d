/**
 * What the status bar item says, from the extension's state and the server's
 * `parafill/status` reply. Pure; the item itself lives in the controller.
 */

/** The `parafill/status` reply, as far as the extension reads it. */
export interface ServerStatus {
  model?: string;
  device?: string;
  state?: string;
  latency?: { p50?: number | null; p90?: number | null; p99?: number | null };
  cacheHitRate?: number | null;
  [key: string]: unknown;
}

export type ClientState = 'starting' | 'running' | 'stopped' | 'failed';

export interface StatusInput {
  enabled: boolean;
  client: ClientState;
  status?: ServerStatus;
  /** Round trip of the last inline completion request, measured in the editor. */
  lastLatencyMs?: number;
  problem?: string;
}

export interface StatusText {
  text: string;
  tooltip: string;
}

function ms(value: number | null | undefined): string {
  return typeof value === 'number' && Number.isFinite(value) ? `${Math.round(value)} ms` : '–';
}

function shortModel(model: string | undefined): string {
  if (!model) {
    return '?';
  }
  const parts = model.split(/[\\/]/).filter(Boolean);
  return parts[parts.length - 1] ?? model;
}

export function statusText(input: StatusInput): StatusText {
  const lines: string[] = [];
  let text: string;
  if (input.problem || input.client === 'failed') {
    text = '$(warning) parafill';
    lines.push(input.problem ?? 'The server is not running.');
  } else if (input.client === 'starting' || /load|start/i.test(input.status?.state ?? '')) {
    text = '$(loading~spin) parafill';
    lines.push('Starting the server / loading the model…');
  } else if (input.client === 'stopped') {
    text = '$(debug-stop) parafill';
    lines.push('The server is stopped.');
  } else if (!input.enabled) {
    text = '$(circle-slash) parafill';
    lines.push('Suggestions are off.');
  } else {
    const latency = input.lastLatencyMs !== undefined ? ` ${ms(input.lastLatencyMs)}` : '';
    text = `$(sparkle) parafill${latency}`;
    lines.push('Suggestions are on.');
  }
  const status = input.status;
  if (status) {
    lines.push(`Model: ${shortModel(status.model)} on ${status.device ?? '?'} (${status.state ?? '?'})`);
    const l = status.latency ?? {};
    lines.push(`Server latency p50 ${ms(l.p50)}, p90 ${ms(l.p90)}, p99 ${ms(l.p99)}`);
    if (typeof status.cacheHitRate === 'number') {
      lines.push(`Cache hit rate ${(status.cacheHitRate * 100).toFixed(0)}%`);
    }
  }
  if (input.lastLatencyMs !== undefined) {
    lines.push(`Last suggestion: ${ms(input.lastLatencyMs)} round trip`);
  }
  lines.push(input.enabled ? 'Click to turn suggestions off.' : 'Click to turn suggestions on.');
  return { text, tooltip: lines.join('\n') };
}
