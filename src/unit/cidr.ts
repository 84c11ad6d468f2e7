// Address matching for access control: the --allow list and per-volume grants.
// Pure functions over 16-byte addresses; IPv4 addresses live in the
// IPv4-mapped IPv6 space (::ffff:a.b.c.d), so a peer that arrives as
// "::ffff:127.0.0.1" on a dual-stack socket matches the IPv4 CIDR 127.0.0.0/8.

import { isIPv4, isIPv6 } from "node:net";

export interface Cidr {
  /** Canonical text: "10.1.0.5" (one host), "10.1.0.0/16", "fd00::/64". */
  readonly text: string;
  readonly bytes: Uint8Array; // 16 bytes, host bits cleared
  readonly prefixBits: number; // 0..128 in the 16-byte space
}

export type CidrParse = { readonly ok: true; readonly cidr: Cidr } | { readonly ok: false; readonly reason: string };

const V4_MAPPED_PREFIX_BITS = 96;

/** Parses an IPv4 or IPv6 address (no prefix) into 16 bytes, or undefined. */
export function parseAddress(text: string): Uint8Array | undefined {
  if (isIPv4(text)) return v4ToMapped(text);
  if (!isIPv6(text)) return undefined;
  const zoneless = text.replace(/%.*$/, "");
  let head = zoneless;
  let tail = "";
  const doubleColon = zoneless.indexOf("::");
  if (doubleColon >= 0) {
    head = zoneless.slice(0, doubleColon);
    tail = zoneless.slice(doubleColon + 2);
  }
  const headGroups = head === "" ? [] : head.split(":");
  const tailGroups = tail === "" ? [] : tail.split(":");
  const words: number[] = [];
  const pushGroups = (groups: string[], out: number[]): boolean => {
    for (const group of groups) {
      if (isIPv4(group)) {
        const v4 = v4ToMapped(group);
        out.push(((v4[12] ?? 0) << 8) | (v4[13] ?? 0), ((v4[14] ?? 0) << 8) | (v4[15] ?? 0));
      } else {
        if (!/^[0-9a-fA-F]{1,4}$/.test(group)) return false;
        out.push(parseInt(group, 16));
      }
    }
    return true;
  };
  const tailWords: number[] = [];
  if (!pushGroups(headGroups, words) || !pushGroups(tailGroups, tailWords)) return undefined;
  const missing = 8 - words.length - tailWords.length;
  if (missing < 0 || (doubleColon < 0 && missing !== 0)) return undefined;
  for (let i = 0; i < missing; i++) words.push(0);
  words.push(...tailWords);
  const bytes = new Uint8Array(16);
  words.forEach((word, i) => {
    bytes[i * 2] = word >> 8;
    bytes[i * 2 + 1] = word & 0xff;
  });
  return bytes;
}

function v4ToMapped(text: string): Uint8Array {
  const bytes = new Uint8Array(16);
  bytes[10] = 0xff;
  bytes[11] = 0xff;
  text.split(".").forEach((part, i) => {
    bytes[12 + i] = Number(part);
  });
  return bytes;
}

function isMappedV4(bytes: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (bytes[i] !== 0) return false;
  return bytes[10] === 0xff && bytes[11] === 0xff;
}

function formatBytes(bytes: Uint8Array): string {
  if (isMappedV4(bytes)) return `${bytes[12]}.${bytes[13]}.${bytes[14]}.${bytes[15]}`;
  const words: string[] = [];
  for (let i = 0; i < 16; i += 2) words.push((((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0)).toString(16));
  // Compress the longest run of zero words (RFC 5952).
  let bestStart = -1;
  let bestLength = 0;
  for (let i = 0; i < 8; ) {
    if (words[i] !== "0") {
      i += 1;
      continue;
    }
    let j = i;
    while (j < 8 && words[j] === "0") j += 1;
    if (j - i > bestLength && j - i >= 2) {
      bestStart = i;
      bestLength = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return words.join(":");
  return `${words.slice(0, bestStart).join(":")}::${words.slice(bestStart + bestLength).join(":")}`;
}

/** "10.0.0.0/8", "10.1.0.5" (= /32), "fd00::/64", "::1" (= /128). */
export function parseCidr(text: string): CidrParse {
  if (typeof text !== "string" || text.length === 0 || text.length > 64) {
    return { ok: false, reason: "expected an IP address or CIDR such as 10.0.0.0/8 or fd00::/64" };
  }
  const slash = text.indexOf("/");
  const addressText = slash < 0 ? text : text.slice(0, slash);
  const bytes = parseAddress(addressText);
  if (bytes === undefined || addressText.includes("%")) {
    return { ok: false, reason: `"${addressText}" is not an IPv4 or IPv6 address` };
  }
  const v4 = isIPv4(addressText);
  const familyBits = v4 ? 32 : 128;
  let prefix = familyBits;
  if (slash >= 0) {
    const prefixText = text.slice(slash + 1);
    if (!/^[0-9]{1,3}$/.test(prefixText) || Number(prefixText) > familyBits) {
      return { ok: false, reason: `prefix length "${prefixText}" must be 0..${familyBits}` };
    }
    prefix = Number(prefixText);
  }
  const prefixBits = v4 ? V4_MAPPED_PREFIX_BITS + prefix : prefix;
  const masked = maskBytes(bytes, prefixBits);
  // A single host is written without a prefix ("10.1.0.5"), a network with one ("10.1.0.0/16").
  // An IPv4-mapped IPv6 network ("::ffff:10.0.0.0/104") is written in its IPv4 form ("10.0.0.0/8").
  const asV4 = isMappedV4(masked) && prefixBits >= V4_MAPPED_PREFIX_BITS;
  const shownPrefix = asV4 ? prefixBits - V4_MAPPED_PREFIX_BITS : prefixBits;
  const shownFull = asV4 ? 32 : 128;
  const canonical = shownPrefix === shownFull ? formatBytes(masked) : `${formatBytes(masked)}/${shownPrefix}`;
  return { ok: true, cidr: { text: canonical, bytes: masked, prefixBits } };
}

function maskBytes(bytes: Uint8Array, prefixBits: number): Uint8Array {
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) {
    const bits = Math.max(0, Math.min(8, prefixBits - i * 8));
    out[i] = (bytes[i] ?? 0) & ((0xff << (8 - bits)) & 0xff);
  }
  return out;
}

/** True if the peer address (any textual form, IPv4-mapped included) lies in the CIDR. */
export function cidrContains(cidr: Cidr, address: string): boolean {
  const bytes = parseAddress(address);
  if (bytes === undefined) return false;
  const masked = maskBytes(bytes, cidr.prefixBits);
  for (let i = 0; i < 16; i++) if (masked[i] !== cidr.bytes[i]) return false;
  return true;
}

export function anyContains(cidrs: readonly Cidr[], address: string): boolean {
  return cidrs.some((cidr) => cidrContains(cidr, address));
}

/** The default --allow list: loopback only. */
export function loopbackCidrs(): Cidr[] {
  return ["127.0.0.0/8", "::1/128"].map((text) => {
    const parsed = parseCidr(text);
    if (!parsed.ok) throw new Error(`bad built-in CIDR ${text}`);
    return parsed.cidr;
  });
}
