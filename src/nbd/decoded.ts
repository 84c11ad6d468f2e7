// The result of every incremental NBD decoder: not enough bytes yet, one whole
// frame (consumed from the queue), or input that can never become valid (the
// queue is left as it was; the caller replies with an error or disconnects).

export type Decoded<F, I extends { readonly reason: string }> =
  | { readonly kind: "need_more"; readonly bytesNeeded: number }
  | { readonly kind: "frame"; readonly frame: F }
  | ({ readonly kind: "invalid" } & I);

export function needMore(bytesNeeded: number): { readonly kind: "need_more"; readonly bytesNeeded: number } {
  return { kind: "need_more", bytesNeeded };
}

/** Strings on the wire: UTF-8, no NUL, at most WIRE.STRING_BYTES_MAX bytes. */
const UTF8 = new TextDecoder("utf-8", { fatal: true });

export function decodeWireString(bytes: Buffer): string | undefined {
  if (bytes.includes(0)) return undefined;
  try {
    return UTF8.decode(bytes);
  } catch {
    return undefined;
  }
}

/** Writes a value below 2^53 as an unsigned 64-bit big-endian integer. */
export function writeU64(target: Buffer, value: number, at: number): void {
  target.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at);
  target.writeUInt32BE(value >>> 0, at + 4);
}

/**
 * Reads an unsigned 64-bit big-endian integer as a number. Values at or above
 * 2^53 come out rounded, which is harmless where they are used: every such
 * offset is past the end of any export (exports are below 2^53 bytes).
 */
export function readU64(source: Buffer, at: number): number {
  return source.readUInt32BE(at) * 0x1_0000_0000 + source.readUInt32BE(at + 4);
}
