// Progress of long CLI operations (issue 9 item 15): on a terminal, one line
// on stderr, rewritten in place, with what is happening, the percent and
// bytes when known, and the elapsed time; ended with a newline when the
// operation ends. Nothing at all with --json or when stderr is not a TTY, so
// scripts and pipes see only the command's output. Every long operation uses
// this one module: station tasks the CLI follows (volume wipe, grow, delete,
// allocation, unassign, `ipsan tasks wait`), `ipsan host detach|release`
// waiting for nbdfuse or the mirror engine to exit.

import { setLogLineGuard } from "./log.ts";
import { formatSize } from "./size.ts";

/** The line is rewritten at most this often (the last state is always shown at the end). */
export const PROGRESS_REFRESH_MS = 200;
/** The longest line written (longer text is cut). */
export const PROGRESS_LINE_CHARS_MAX = 160;

export interface ProgressAmount {
  readonly done: number;
  readonly total: number;
  readonly unit: "bytes" | "steps" | string;
}

export interface ProgressLine {
  /** What is happening now, with how much is done when known. */
  update(what: string, amount?: ProgressAmount | null): void;
  /** Ends the line: the last state, a newline. Later updates are ignored. */
  end(what?: string): void;
}

const SILENT: ProgressLine = { update: () => undefined, end: () => undefined };

export interface ProgressOptions {
  /** --json: machine-readable output only, no progress. */
  readonly json?: boolean;
  /** Default process.stderr; nothing is shown unless it is a TTY. */
  readonly stream?: NodeJS.WriteStream;
  readonly now?: () => number;
}

/** "42% (27M of 64M)", "3/5 steps", or "" when nothing is known. */
export function describeAmount(amount: ProgressAmount | null | undefined): string {
  if (amount === null || amount === undefined || !(amount.total > 0)) return "";
  const percent = Math.min(100, Math.floor((100 * amount.done) / amount.total));
  return amount.unit === "bytes" ? `${percent}% (${formatSize(amount.done)} of ${formatSize(amount.total)})` : `${amount.done}/${amount.total} steps`;
}

/** "0.4s", "12s", "3m05s". */
export function describeElapsed(ms: number): string {
  if (ms < 10_000) return `${(ms / 1000).toFixed(1)}s`;
  const seconds = Math.floor(ms / 1000);
  if (seconds < 60) return `${seconds}s`;
  return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
}

/** A progress line for one operation (silent with --json or without a TTY). */
export function progressLine(label: string, options: ProgressOptions = {}): ProgressLine {
  const stream = options.stream ?? process.stderr;
  if (options.json === true || stream.isTTY !== true) return SILENT;
  const now = options.now ?? Date.now;
  const startedMs = now();
  let lastWrittenMs = -Infinity;
  let last = "";
  let lastLine = "";
  let shown = false;
  let ended = false;
  // A log line while the progress line shows: clear it, let the log line through, redraw it.
  const guard = (writeLog: () => void): void => {
    stream.write("\r\x1b[K");
    writeLog();
    stream.write(`\r${lastLine}\x1b[K`);
  };
  const render = (what: string, amount: ProgressAmount | null | undefined): string => {
    const parts = [label, what, describeAmount(amount), describeElapsed(now() - startedMs)].filter((part) => part !== "");
    return parts.join(" ").slice(0, PROGRESS_LINE_CHARS_MAX);
  };
  // \r back to the start, ESC [K clears what a longer line before left.
  const write = (text: string): void => {
    stream.write(`\r${text}\x1b[K`);
    lastLine = text;
    if (!shown && stream === process.stderr) setLogLineGuard(guard);
    shown = true;
    lastWrittenMs = now();
  };
  return {
    update(what, amount) {
      if (ended) return;
      last = what;
      if (now() - lastWrittenMs < PROGRESS_REFRESH_MS) return;
      write(render(what, amount));
    },
    end(what) {
      if (ended) return;
      ended = true;
      if (what !== undefined) write(render(what, null));
      else if (!shown) return;
      else write(render(last, null));
      stream.write("\n");
      if (stream === process.stderr) setLogLineGuard(undefined);
    },
  };
}

/** What a station task says of itself (src/host/station_client.ts StationTask, structurally). */
export interface TaskState {
  readonly id: string;
  readonly kind: string;
  readonly state: string;
  readonly progress: ProgressAmount | null;
  readonly finishedAt: string | null;
}

/**
 * The callback a station client calls on each poll of a task it follows
 * (StationClient onTask): one progress line per task, ended when it finishes.
 * Undefined (no callback) with --json or without a TTY.
 */
export function taskProgress(options: ProgressOptions = {}): ((task: TaskState) => void) | undefined {
  const stream = options.stream ?? process.stderr;
  if (options.json === true || stream.isTTY !== true) return undefined;
  const lines = new Map<string, ProgressLine>();
  return (task) => {
    let line = lines.get(task.id);
    if (line === undefined) {
      line = progressLine(`task ${task.id} ${task.kind}`, options);
      lines.set(task.id, line);
    }
    if (task.finishedAt === null) line.update(task.state, task.progress);
    else line.end(`${task.state}${describeAmount(task.progress) === "" ? "" : ` ${describeAmount(task.progress)}`}`);
  };
}
