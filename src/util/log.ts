// Logging: one line per event on stderr, "TIME LEVEL component: message key=value"
// (TIME in ISO 8601, UTC, milliseconds), or with IPSAN_LOG_FORMAT=json /
// `--log-format json` one JSON object per line for log shippers:
// {"time","level","component","msg",...fields} (docs/ARCHITECTURE.md "Logs").
// stdout is reserved for the contract lines ("ipsan unit NAME ready ...").
// Noisy events (rejected packets, hostile clients) go through a rate limiter
// so a flood cannot fill the disk or stall the event loop.

export type LogLevel = "debug" | "info" | "warn" | "error";
const LEVEL_ORDER: Readonly<Record<LogLevel, number>> = { debug: 10, info: 20, warn: 30, error: 40 };

let threshold: LogLevel = (process.env["IPSAN_LOG"] as LogLevel | undefined) ?? "info";
if (!(threshold in LEVEL_ORDER)) threshold = "info";

export function setLogLevel(level: LogLevel): void {
  threshold = level;
}

export const LOG_FORMATS = ["text", "json"] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

let format: LogFormat = process.env["IPSAN_LOG_FORMAT"] === "json" ? "json" : "text";

export function setLogFormat(value: LogFormat): void {
  format = value;
}

export function logFormat(): LogFormat {
  return format;
}

export type Fields = Readonly<Record<string, string | number | boolean | bigint | undefined | null>>;

function formatFields(fields: Fields | undefined): string {
  if (fields === undefined) return "";
  let out = "";
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined) continue;
    const text = String(value);
    out += ` ${key}=${/[\s"]/.test(text) ? JSON.stringify(text) : text}`;
  }
  return out;
}

/** One log line, newline included, in the current format. */
export function formatLine(time: string, level: LogLevel, component: string, message: string, fields?: Fields): string {
  if (format === "text") return `${time} ${level.toUpperCase()} ${component}: ${message}${formatFields(fields)}\n`;
  const record: Record<string, unknown> = { time, level, component, msg: message };
  if (fields !== undefined) {
    for (const [key, value] of Object.entries(fields)) {
      if (value === undefined || key in record) continue;
      record[key] = typeof value === "bigint" ? value.toString() : value;
    }
  }
  return `${JSON.stringify(record)}\n`;
}

export interface Logger {
  debug(message: string, fields?: Fields): void;
  info(message: string, fields?: Fields): void;
  warn(message: string, fields?: Fields): void;
  error(message: string, fields?: Fields): void;
  /** Like warn, but at most `RATE_LIMIT_PER_WINDOW` lines per key per window. */
  limited(key: string, message: string, fields?: Fields): void;
}

const RATE_LIMIT_WINDOW_MS = 10_000;
const RATE_LIMIT_PER_WINDOW = 10;
const RATE_LIMIT_KEYS_MAX = 1024;

let lineGuard: ((write: () => void) => void) | undefined;

/**
 * A terminal's progress line (src/util/progress.ts) wraps each log line while
 * it shows: it clears itself first and redraws after, so the two never share
 * a line. undefined removes the guard.
 */
export function setLogLineGuard(guard: ((write: () => void) => void) | undefined): void {
  lineGuard = guard;
}

export function logger(component: string): Logger {
  const windows = new Map<string, { startMs: number; count: number; dropped: number }>();
  const emit = (level: LogLevel, message: string, fields?: Fields): void => {
    if (LEVEL_ORDER[level] < LEVEL_ORDER[threshold]) return;
    const write = (): void => {
      process.stderr.write(formatLine(new Date().toISOString(), level, component, message, fields));
    };
    if (lineGuard === undefined) write();
    else lineGuard(write);
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    limited(key, message, fields) {
      const nowMs = Date.now();
      let window = windows.get(key);
      if (window === undefined || nowMs - window.startMs > RATE_LIMIT_WINDOW_MS) {
        if (window !== undefined && window.dropped > 0) {
          emit("warn", `${window.dropped} similar messages suppressed`, { key });
        }
        if (windows.size >= RATE_LIMIT_KEYS_MAX) windows.clear();
        window = { startMs: nowMs, count: 0, dropped: 0 };
        windows.set(key, window);
      }
      window.count += 1;
      if (window.count <= RATE_LIMIT_PER_WINDOW) emit("warn", message, fields);
      else window.dropped += 1;
    },
  };
}
