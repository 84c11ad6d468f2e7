// Temporary directories for tests: one per test file or server, under the OS
// temp dir, removed by the test's cleanup (after(), finally) even on failure.
// IPSAN_KEEP_TMP=1 keeps them for a post-mortem and says where they are.

import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface TempDir {
  readonly path: string;
  /** Path of a name inside the directory. */
  file(name: string): string;
  remove(): void;
}

/** `base` (default the OS temp dir) lets a test choose its filesystem, e.g. memoryTmpBase() where fsync costs nothing. */
export function makeTempDir(prefix: string, base = tmpdir()): TempDir {
  const path = mkdtempSync(join(base, `ipsan-${prefix.replace(/[^\w.-]/g, "_")}-`));
  return {
    path,
    file: (name) => join(path, name),
    remove() {
      if (process.env["IPSAN_KEEP_TMP"] === "1") {
        process.stderr.write(`kept temp dir ${path}\n`);
        return;
      }
      rmSync(path, { recursive: true, force: true, maxRetries: 3 });
    },
  };
}

/** /dev/shm (tmpfs: fsync returns at once) when the machine has it, else the OS temp dir. */
export function memoryTmpBase(): string {
  return existsSync("/dev/shm") ? "/dev/shm" : tmpdir();
}
