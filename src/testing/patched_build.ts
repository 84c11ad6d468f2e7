// A copy of the built program with a defect put back on purpose, for canary
// tests: a test that must notice a defect is run against the copy and has to
// fail there. The copy holds what `bin/ipsan unit` needs at run time and
// nothing else: bin/, package.json ("type": "module" makes bin/ipsan an ES
// module), dist/ without the tests and source maps, and the native addon
// build/Release/ipsan_io.node (dist/unit/native.js loads it by a relative
// path). The unit imports no npm package (its --iscsi side, loaded only with
// that flag, needs @node-rs/crc32), so node_modules is not copied; a command
// that does (the station, better-sqlite3, a unit with --iscsi) would fail
// loudly in a copy unless `nodeModules` links the checkout's node_modules into it.
//
// Each edit replaces text of the compiled JavaScript and must find it exactly
// as many times as it expects (once unless told): when the code moves, the
// canary fails with a message saying so instead of silently testing nothing.

import { cpSync, readFileSync, realpathSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { makeTempDir } from "./tmp.ts";
import { REPO_ROOT } from "./unit.ts";

export interface BuildEdit {
  /** Path inside the build, e.g. "dist/unit/storage.js". */
  readonly file: string;
  readonly from: string;
  readonly to: string;
  /** How many times `from` must occur (default 1); every occurrence is replaced. */
  readonly count?: number;
}

export interface PatchedBuild {
  readonly root: string;
  /** bin/ipsan of the copy. */
  readonly ipsanBin: string;
  remove(): void;
}

/** How many times `needle` occurs in `text` (non-overlapping). */
export function occurrences(text: string, needle: string): number {
  return needle === "" ? 0 : text.split(needle).length - 1;
}

export function patchedBuild(prefix: string, edits: readonly BuildEdit[], source: string = REPO_ROOT, options: { nodeModules?: boolean } = {}): PatchedBuild {
  const dir = makeTempDir(prefix);
  try {
    if (options.nodeModules === true) symlinkSync(realpathSync(join(source, "node_modules")), dir.file("node_modules"));
    cpSync(join(source, "package.json"), dir.file("package.json"));
    cpSync(join(source, "bin"), dir.file("bin"), { recursive: true });
    cpSync(join(source, "build", "Release", "ipsan_io.node"), join(dir.path, "build", "Release", "ipsan_io.node"));
    cpSync(join(source, "dist"), dir.file("dist"), {
      recursive: true,
      filter: (path) => !path.endsWith("_test.js") && !path.endsWith(".map"),
    });
    for (const edit of edits) {
      const path = join(dir.path, edit.file);
      const text = readFileSync(path, "utf8");
      const expected = edit.count ?? 1;
      const found = occurrences(text, edit.from);
      if (found !== expected) {
        throw new Error(`canary build: ${edit.file} holds ${JSON.stringify(edit.from)} ${found} times, expected ${expected} (the compiled code changed; update the canary)`);
      }
      writeFileSync(path, text.split(edit.from).join(edit.to));
    }
  } catch (error) {
    dir.remove();
    throw error;
  }
  return { root: dir.path, ipsanBin: join(dir.path, "bin", "ipsan"), remove: () => dir.remove() };
}
