/**
 * When the server process dies: restart it quietly a few times, then stop and
 * say so once. A server that crashes on start would otherwise be restarted in a
 * loop, with a notification each time.
 *
 * Pure: time is passed in.
 */

export type CrashDecision = 'restart' | 'give-up';

export class CrashPolicy {
  private crashes: number[] = [];

  constructor(
    private readonly maxRestarts = 3,
    private readonly windowMs = 3 * 60 * 1000,
  ) {}

  /** Record a crash at `nowMs` and decide what to do. */
  onCrash(nowMs: number): CrashDecision {
    this.crashes = this.crashes.filter((t) => nowMs - t < this.windowMs);
    this.crashes.push(nowMs);
    return this.crashes.length > this.maxRestarts ? 'give-up' : 'restart';
  }

  /** Crashes inside the current window. */
  get recentCrashes(): number {
    return this.crashes.length;
  }

  /** A deliberate restart (the user asked) starts counting afresh. */
  reset(): void {
    this.crashes = [];
  }
}
