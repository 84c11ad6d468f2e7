// The TLS-PSK keys of the hosts a unit's identity grants name:
// DATA/host-keys.psk, mode 0600, in psktool format (`host:hexkey` per line,
// the format libnbd, nbdkit and GnuTLS read). The volume table holds the
// grants and a non-secret keyId of each key (table.ts), never the key; this
// file holds the keys and nothing else. It is replaced whole: written to a
// temporary file, fsynced, renamed into place, and the directory fsynced,
// so a crash leaves the old file or the new one. The manager writes it
// before the table that refers to it (volumes.ts), so a grant is never
// durable without its key; a key whose grant did not make it is pruned at
// the next change. Keys are never logged and never in an answer.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { formatPskFile, parsePskFile } from "../nbd/tls.ts";
import { writeSecretFileAtomic } from "../util/secret_file.ts";

export const HOST_KEYS_FILE_NAME = "host-keys.psk";

export class HostKeys {
  readonly path: string;
  #keys: ReadonlyMap<string, Buffer>;

  private constructor(path: string, keys: ReadonlyMap<string, Buffer>) {
    this.path = path;
    this.#keys = keys;
  }

  /** Reads DATA/host-keys.psk (absent: no keys). A file that does not parse stops the unit: its grants would admit no one. */
  static load(dataDir: string): HostKeys {
    const path = join(dataDir, HOST_KEYS_FILE_NAME);
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return new HostKeys(path, new Map());
      throw new IpsanError("IO_ERROR", `cannot read ${path}: ${errorMessage(error)}`);
    }
    const parsed = parsePskFile(text);
    if (!parsed.ok) throw new IpsanError("CORRUPT", `${path}: ${parsed.reason}`);
    return new HostKeys(path, parsed.keys);
  }

  get(identity: string): Buffer | undefined {
    return this.#keys.get(identity);
  }

  get size(): number {
    return this.#keys.size;
  }

  /** The keys as they are now (a copy). */
  entries(): Map<string, Buffer> {
    return new Map(this.#keys);
  }

  /** Replaces the file with exactly `keys` (durably) and then serves them. Nothing is written when they are the same. */
  async replace(keys: ReadonlyMap<string, Buffer>): Promise<void> {
    if (sameKeys(this.#keys, keys)) return;
    await writeSecretFileAtomic(this.path, formatPskFile(keys));
    this.#keys = new Map(keys);
  }
}

function sameKeys(a: ReadonlyMap<string, Buffer>, b: ReadonlyMap<string, Buffer>): boolean {
  if (a.size !== b.size) return false;
  for (const [identity, key] of a) {
    const other = b.get(identity);
    if (other === undefined || !other.equals(key)) return false;
  }
  return true;
}
