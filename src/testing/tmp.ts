// Temporary directories for tests: one per test file or server, under the OS
// temp dir, removed by the test's cleanup (after(), finally) even on failure.
// IPSAN_KEEP_TMP=1 keeps them for a post-mortem and says where they are.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface TempDir {
  readonly path: string;
  /** Path of a name inside the directory. */
  file(name: string): string;
  remove(): void;
}

export function makeTempDir(prefix: string): TempDir {
  const path = mkdtempSync(join(tmpdir(), `ipsan-${prefix.replace(/[^\w.-]/g, "_")}-`));
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
