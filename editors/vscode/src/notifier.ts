/**
 * Tell the user about a problem once: the same problem (same key and message)
 * is never shown twice until it is cleared, e.g. after the user changed the
 * setting or restarted the server. Keeps the editor quiet while a broken
 * setup is retried on every keystroke.
 *
 * Pure: the actual UI call is injected.
 */

export interface Notice {
  message: string;
  /** Button labels; the chosen one is passed to `onAction`. */
  actions: string[];
  severity: 'error' | 'warning' | 'info';
}

export type ShowNotice = (notice: Notice) => PromiseLike<string | undefined>;

export class OnceNotifier {
  private readonly shown = new Map<string, string>();

  constructor(
    private readonly show: ShowNotice,
    private readonly onAction: (key: string, action: string) => void,
  ) {}

  /** Show `notice` unless the same message was already shown under `key`; true when shown. */
  notify(key: string, notice: Notice): boolean {
    if (this.shown.get(key) === notice.message) {
      return false;
    }
    this.shown.set(key, notice.message);
    void Promise.resolve(this.show(notice)).then((action) => {
      if (action !== undefined) {
        this.onAction(key, action);
      }
    });
    return true;
  }

  /** Forget `key` (or everything), so its next problem is shown again. */
  clear(key?: string): void {
    if (key === undefined) {
      this.shown.clear();
    } else {
      this.shown.delete(key);
    }
  }

  has(key: string): boolean {
    return this.shown.has(key);
  }
}
