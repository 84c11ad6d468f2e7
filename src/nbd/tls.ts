// NBD over TLS with pre-shared keys (NBD_OPT_STARTTLS, doc/proto.md): what
// the server and the client share. Keys are in the format libnbd's
// `tls-psk-file`, nbdkit's `--tls-psk` and GnuTLS psktool use: one
// `identity:hexkey` per line. The identity is the host's name (e.g. `h1`).
//
// TLS 1.3 with PSK: OpenSSL (Node 20) negotiates TLS 1.3 against GnuTLS
// (libnbd, qemu) with the legacy PSK callbacks Node uses, as long as a TLS 1.3
// suite with SHA-256 is offered (OpenSSL assumes SHA-256 for such keys);
// TLS 1.2 PSK suites stay available for older clients (docs/protocol/nbd.md).

import { createHash } from "node:crypto";

/** off: no STARTTLS; on: STARTTLS offered, plaintext allowed; require: nothing but STARTTLS/ABORT before TLS. */
export type TlsMode = "off" | "on" | "require";
export const TLS_MODES: readonly TlsMode[] = ["off", "on", "require"];

/** The server side: how keys are found, and whether TLS is required. */
export interface NbdServerTls {
  readonly mode: "on" | "require";
  /** The key of a PSK identity, or undefined (the handshake then fails). */
  keyFor(identity: string): Buffer | undefined;
}

/** The client side: the identity and key to offer. */
export interface NbdClientTls {
  readonly identity: string;
  readonly key: Buffer;
}

/**
 * TLS 1.2 suites: PSK with forward secrecy first (what GnuTLS's NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK
 * offers), then plain PSK. TLS 1.3 suites are set apart (Node's `ciphers` takes both; OpenSSL
 * sorts them out): SHA-256 ones only, the hash OpenSSL assumes for a PSK from the callback.
 */
export const PSK_CIPHERS = [
  "TLS_AES_128_GCM_SHA256",
  "TLS_CHACHA20_POLY1305_SHA256",
  "ECDHE-PSK-AES256-CBC-SHA384",
  "ECDHE-PSK-AES128-CBC-SHA256",
  "ECDHE-PSK-CHACHA20-POLY1305",
  "DHE-PSK-AES256-GCM-SHA384",
  "DHE-PSK-AES128-GCM-SHA256",
  "PSK-AES256-GCM-SHA384",
  "PSK-AES128-GCM-SHA256",
  "PSK-CHACHA20-POLY1305",
].join(":");

/** Keys are 32 random bytes (64 hex digits) as the station issues them; files may hold shorter keys (psktool's default is 32 bytes too). */
export const PSK_KEY_BYTES = 32;
export const PSK_KEY_HEX_PATTERN = /^[0-9a-fA-F]{64}$/;
/** A PSK identity: a station host name, or any psktool identity without ':' or whitespace. */
export const PSK_IDENTITY_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$/;
/** Lines (identities) in one key file at most. */
export const PSK_FILE_ENTRIES_MAX = 65_536;

/** A short, non-secret name of a key (16 hex digits of its SHA-256): tells whether a host's key changed. */
export function pskKeyId(key: Buffer): string {
  return createHash("sha256").update("ipsan-psk-key-id:").update(key).digest("hex").slice(0, 16);
}

export type PskFileParse = { readonly ok: true; readonly keys: Map<string, Buffer> } | { readonly ok: false; readonly reason: string };

/** Parses a psktool-format file: `identity:hexkey` per line; blank lines and `#` comments are skipped. */
export function parsePskFile(text: string): PskFileParse {
  const keys = new Map<string, Buffer>();
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = (lines[i] ?? "").trim();
    if (line === "" || line.startsWith("#")) continue;
    const colon = line.lastIndexOf(":");
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !PSK_IDENTITY_PATTERN.test(identity)) return { ok: false, reason: `line ${i + 1}: expected IDENTITY:HEXKEY with a valid identity` };
    if (!/^([0-9a-fA-F]{2}){16,64}$/.test(hex)) return { ok: false, reason: `line ${i + 1}: key of ${identity} is not 16..64 bytes of hex` };
    if (keys.has(identity)) return { ok: false, reason: `line ${i + 1}: identity ${identity} given twice` };
    if (keys.size >= PSK_FILE_ENTRIES_MAX) return { ok: false, reason: `more than ${PSK_FILE_ENTRIES_MAX} identities` };
    keys.set(identity, Buffer.from(hex, "hex"));
  }
  return { ok: true, keys };
}

/** The psktool-format text of `keys`, sorted by identity. */
export function formatPskFile(keys: ReadonlyMap<string, Buffer>): string {
  return [...keys.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([identity, key]) => `${identity}:${key.toString("hex")}\n`)
    .join("");
}
