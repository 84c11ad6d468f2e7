// Test data: deterministic pseudo-random bytes from a printed seed (AES-256-CTR
// keystream, so hundreds of MiB take well under a second and any failure can be
// replayed with the same seed), and SHA-256 of files and byte ranges.

import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { createReadStream, openSync, writeSync, closeSync } from "node:fs";

/** Bytes generated and written per step. */
export const DATA_CHUNK_BYTES = 4 * 1024 * 1024;

/** A fresh random seed as hex, to be printed by the test that uses it. */
export function newSeed(): string {
  return randomBytes(16).toString("hex");
}

/** A stream of pseudo-random bytes fully determined by `seed` (any string). */
export class SeededBytes {
  private readonly cipher;
  constructor(seed: string) {
    const key = createHash("sha256").update(`ipsan-test-data:${seed}`).digest();
    this.cipher = createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  }
  next(lengthBytes: number): Buffer {
    return this.cipher.update(Buffer.alloc(lengthBytes));
  }
}

/** Creates (or overwrites) `path` with `sizeBytes` of seeded random data; returns its SHA-256 hex. */
export function writeRandomFile(path: string, sizeBytes: number, seed: string): string {
  const source = new SeededBytes(seed);
  const hash = createHash("sha256");
  const fd = openSync(path, "w");
  try {
    for (let offset = 0; offset < sizeBytes; offset += DATA_CHUNK_BYTES) {
      const chunk = source.next(Math.min(DATA_CHUNK_BYTES, sizeBytes - offset));
      hash.update(chunk);
      let written = 0;
      while (written < chunk.length) written += writeSync(fd, chunk, written, chunk.length - written);
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

export function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

/** SHA-256 hex of a whole file, streamed. */
export function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(path, { highWaterMark: DATA_CHUNK_BYTES })
      .on("data", (chunk) => hash.update(chunk))
      .on("error", reject)
      .on("end", () => resolve(hash.digest("hex")));
  });
}
