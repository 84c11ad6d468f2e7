// Sizes on the command line and in the API: plain bytes, or a number with a
// K, M, G or T suffix (powers of 1024). Fractions are allowed only when they
// come out to a whole number of bytes ("1.5G" is fine, "1.3K" is not).

import { UsageError } from "./errors.ts";

const SUFFIX_MULTIPLIER: Readonly<Record<string, number>> = {
  "": 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
};

const SIZE_PATTERN = /^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?$/i;

/** Parses SIZE; `field` names the flag or JSON field in the error message. */
export function parseSize(text: string, field: string): number {
  const match = SIZE_PATTERN.exec(text.trim());
  if (match === null) {
    throw new UsageError(`${field}: invalid size "${text}" (expected bytes or a number with K, M, G or T)`);
  }
  const multiplier = SUFFIX_MULTIPLIER[(match[2] ?? "").toUpperCase()];
  if (multiplier === undefined) throw new UsageError(`${field}: invalid size suffix in "${text}"`);
  const bytes = Number(match[1]) * multiplier;
  if (!Number.isSafeInteger(bytes)) {
    throw new UsageError(`${field}: size "${text}" is not a whole number of bytes or is too large`);
  }
  return bytes;
}

/** Human form for messages: 1073741824 -> "1G", 1536 -> "1.5K". */
export function formatSize(bytes: number): string {
  for (const suffix of ["T", "G", "M", "K"] as const) {
    const multiplier = SUFFIX_MULTIPLIER[suffix] ?? 1;
    if (bytes >= multiplier) {
      const value = bytes / multiplier;
      return `${Number.isInteger(value) ? value : value.toFixed(2).replace(/\.?0+$/, "")}${suffix}`;
    }
  }
  return `${bytes}`;
}

/** The size in the largest unit that holds it exactly (4G, 4092M, 1536K), else in bytes. */
export function formatSizeExact(bytes: number): string {
  for (const suffix of ["T", "G", "M", "K"] as const) {
    const multiplier = SUFFIX_MULTIPLIER[suffix] ?? 1;
    if (bytes >= multiplier && bytes % multiplier === 0) return `${bytes / multiplier}${suffix}`;
  }
  return `${bytes}`;
}

/**
 * Sizes printed side by side (a refusal's "need X, free Y"): rounded as formatSize
 * does, unless two different sizes would print the same, then exactly, so that
 * numbers that differ never read alike ("need 4G, free 4092M", not "need 4G, free 4G").
 */
export function formatSizesDistinct(sizes: readonly number[]): string[] {
  const rounded = sizes.map(formatSize);
  for (let i = 0; i < sizes.length; i++) {
    for (let j = i + 1; j < sizes.length; j++) {
      if (sizes[i] !== sizes[j] && rounded[i] === rounded[j]) return sizes.map(formatSizeExact);
    }
  }
  return rounded;
}

/**
 * Partition sizes on a command line, one grammar for `ipsan volume partition`
 * and `ipsan unit volume partition` (issue 9 item 12): sizes separated by
 * spaces (separate arguments), commas, or both: `1G 2G`, `1G,2G`, `1G, 2G`.
 * `none` (alone) or nothing: no partitions. Each bad size names its place.
 */
export function parsePartitionSizes(args: readonly string[], field = "SIZE"): number[] {
  const texts = args.flatMap((arg) => arg.split(",")).map((text) => text.trim()).filter((text) => text !== "");
  if (texts.length === 1 && texts[0] === "none") return [];
  return texts.map((text, i) => parseSize(text, `${field} #${i + 1}`));
}
