// Validation of REST API input: every field checked for type and value, with
// an INVALID_ARGUMENT error whose message and `field` name the field and show
// the value (shortened). Unknown fields are refused too, so a typo
// ("sizebytes") is an error rather than silently ignored.

import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { IpsanError, UsageError } from "../util/errors.ts";
import { parseSize } from "../util/size.ts";
import { iscsiNameProblem } from "../iscsi/names.ts";

export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
export const REQUEST_ID_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;
export const DNS_NAME_PATTERN = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;
/** Largest size accepted anywhere (the unit's STORAGE_BYTES_MAX). */
export const SIZE_BYTES_MAX = 2 ** 53 - 1024 * 1024;
export const SECTOR_BYTES = 512;
/** Partitions in one request (the unit allows 16; leave it to say so for 17..128). */
export const PARTITIONS_MAX = 128;
export const ADDRESS_LOOKUP_TIMEOUT_MS = 2_000;
const SHOWN_CHARS_MAX = 60;

export function show(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > SHOWN_CHARS_MAX ? `${text.slice(0, SHOWN_CHARS_MAX - 3)}...` : text;
}

export function invalid(field: string, message: string): IpsanError {
  return new IpsanError("INVALID_ARGUMENT", `${field}: ${message}`, { field });
}

export function checkName(value: unknown, field: string): string {
  if (typeof value !== "string" || !NAME_PATTERN.test(value)) {
    throw invalid(field, `invalid name ${show(value)} (expected 1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit)`);
  }
  return value;
}

export function checkRequestId(value: unknown, field = "requestId"): string {
  if (typeof value !== "string" || !REQUEST_ID_PATTERN.test(value)) {
    throw invalid(field, `invalid request id ${show(value)} (expected 1-128 of A-Z a-z 0-9 _ . : -)`);
  }
  return value;
}

/** Bytes as a JSON integer, or a string such as "80G"; positive, a multiple of 512, bounded. */
export function checkSize(value: unknown, field: string): number {
  let bytes: number;
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw invalid(field, `${show(value)} is not a whole number of bytes`);
    bytes = value;
  } else if (typeof value === "string" && value.length <= 32) {
    try {
      bytes = parseSize(value, field);
    } catch (error) {
      if (error instanceof UsageError) throw new IpsanError("INVALID_ARGUMENT", error.message, { field });
      throw error;
    }
  } else {
    throw invalid(field, `expected a size in bytes or a string such as "80G", got ${show(value)}`);
  }
  if (bytes <= 0) throw invalid(field, `size ${show(value)} must be positive`);
  if (bytes % SECTOR_BYTES !== 0) throw invalid(field, `size ${show(value)} (${bytes} bytes) is not a multiple of ${SECTOR_BYTES}`);
  if (bytes > SIZE_BYTES_MAX) throw invalid(field, `size ${show(value)} is over the limit ${SIZE_BYTES_MAX}`);
  return bytes;
}

export function checkSizes(value: unknown, field: string): number[] {
  if (!Array.isArray(value)) throw invalid(field, `expected a list of sizes, got ${show(value)}`);
  if (value.length > PARTITIONS_MAX) throw invalid(field, `${value.length} sizes, limit ${PARTITIONS_MAX}`);
  return value.map((v: unknown, i) => checkSize(v, `${field}[${i}]`));
}

export function checkBoolean(value: unknown, field: string): boolean {
  if (typeof value !== "boolean") throw invalid(field, `expected true or false, got ${show(value)}`);
  return value;
}

export function checkIndex(value: unknown, field: string, max: number): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 1 || value > max) {
    throw invalid(field, `expected a whole number 1..${max}, got ${show(value)}`);
  }
  return value;
}

/**
 * A host's data-path address: an IPv4/IPv6 literal, or a DNS name resolved now
 * (the first address found is stored; the grant on the unit is an address).
 */
export async function checkAddress(value: unknown, field: string): Promise<string> {
  if (typeof value !== "string") throw invalid(field, `expected an IP address or DNS name, got ${show(value)}`);
  const literal = value.replace(/^\[(.*)\]$/, "$1");
  if (isIP(literal) !== 0) {
    if (literal.includes("%")) throw invalid(field, `zoned address ${show(value)} is not supported`);
    return literal.toLowerCase();
  }
  if (!DNS_NAME_PATTERN.test(value)) throw invalid(field, `${show(value)} is neither an IP address nor a DNS name`);
  let timer: NodeJS.Timeout | undefined;
  try {
    const result = await Promise.race([
      lookup(value),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${ADDRESS_LOOKUP_TIMEOUT_MS} ms`)), ADDRESS_LOOKUP_TIMEOUT_MS);
      }),
    ]);
    return result.address;
  } catch (error) {
    throw invalid(field, `cannot resolve ${show(value)}: ${(error as Error).message}`);
  } finally {
    clearTimeout(timer);
  }
}

/** A JSON request body: an object with only the allowed fields. */
export class Body {
  readonly fields: Readonly<Record<string, unknown>>;
  constructor(value: unknown, allowed: readonly string[]) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw invalid("body", `expected a JSON object, got ${show(value)}`);
    }
    for (const key of Object.keys(value)) {
      if (!allowed.includes(key)) {
        const field = key === "" ? '""' : key.slice(0, SHOWN_CHARS_MAX);
        throw new IpsanError("INVALID_ARGUMENT", `unknown field ${show(key)} (allowed: ${allowed.join(", ") || "none"})`, { field });
      }
    }
    this.fields = value as Record<string, unknown>;
  }
  has(field: string): boolean {
    return this.fields[field] !== undefined && this.fields[field] !== null;
  }
  required(field: string): unknown {
    if (!this.has(field)) throw invalid(field, "is required");
    return this.fields[field];
  }
  optional(field: string): unknown {
    return this.has(field) ? this.fields[field] : undefined;
  }
}

/**
 * A host's iSCSI initiator name: one of the RFC 3720/3980 forms, lowercase,
 * at most 223 bytes (src/iscsi/names.ts). "" means none (removes it).
 */
export function checkIqn(value: unknown, field: string): string | null {
  if (value === "") return null;
  const problem = iscsiNameProblem(value);
  if (problem !== undefined) throw invalid(field, `${field}: ${problem}`);
  return value as string;
}
