// Durations on the command line: a number with ms, s, m or h ("500ms", "3s",
// "1.5m", "2h"). A bare number is refused: "5" could mean seconds or
// milliseconds, and a wrong guess here decides when the station replaces a
// unit or moves a host's volumes.

import { UsageError } from "./errors.ts";

const UNIT_MS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
const DURATION_PATTERN = /^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$/;
/** Longest duration accepted: 30 days (a timer longer than ~24.8 days also overflows setTimeout). */
export const DURATION_MS_MAX = 30 * 24 * 3_600_000;

/** Parses DURATION into whole milliseconds; `field` names the flag in the error message. */
export function parseDuration(text: string, field: string): number {
  const match = DURATION_PATTERN.exec(text.trim());
  if (match === null) throw new UsageError(`${field}: invalid duration "${text}" (expected a number with ms, s, m or h, e.g. 3s or 5m)`);
  const ms = Number(match[1]) * (UNIT_MS[match[2] ?? ""] ?? Number.NaN);
  if (!Number.isInteger(ms) || ms <= 0 || ms > DURATION_MS_MAX) {
    throw new UsageError(`${field}: duration "${text}" must be a whole number of milliseconds between 1ms and 30 days`);
  }
  return ms;
}

/** Human form for messages and help (at most one decimal): 300000 -> "5m", 1500 -> "1.5s", 1001 -> "1001ms". */
export function formatDuration(ms: number): string {
  for (const [suffix, unit] of [["h", 3_600_000], ["m", 60_000], ["s", 1000]] as const) {
    if (ms >= unit && ms % (unit / 10) === 0) return `${ms / unit}${suffix}`;
  }
  return `${ms}ms`;
}
