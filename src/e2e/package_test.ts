// Issue 9: `npm pack` yields a package that ships no test or benchmark code and
// installs and runs on a fresh machine. The first test compares what the
// package holds with what the program can reach: the modules reachable from
// bin/ipsan's entry (dist/cli.js) and the station's checkpoint worker, by
// their relative imports (static and dynamic). The second installs the packed
// tarball into an empty prefix (npm install, offline from the cache `npm ci`
// filled: the native addons build from source as on a fresh machine) and runs
// the installed `ipsan --version` and `ipsan demo` until it is ready.

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { IpsanChild } from "../demo/child.ts";
import { describeResult, run, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const ENTRIES = ["dist/cli.js", "dist/station/checkpoint_worker.js"];
const IMPORT = /(?:from\s*|import\s*\(\s*|import\s+)["'](\.{1,2}\/[^"']+)["']/g;

/** Repo-relative paths of the modules the program reaches from its entries. */
function reachable(): Set<string> {
  const seen = new Set<string>();
  const stack = ENTRIES.map((entry) => join(REPO, entry));
  while (stack.length > 0) {
    const file = stack.pop() as string;
    const path = relative(REPO, file);
    if (seen.has(path)) continue;
    seen.add(path);
    for (const match of readFileSync(file, "utf8").matchAll(IMPORT)) stack.push(resolve(dirname(file), match[1] as string));
  }
  return seen;
}

async function packedFiles(): Promise<string[]> {
  const packed = await runOk("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], { cwd: REPO, timeoutMs: 120_000 });
  return (JSON.parse(packed.stdout) as { files: { path: string }[] }[])[0]?.files.map((f) => f.path) ?? [];
}

test("npm pack ships exactly what the program reaches: no test, harness, simulation or benchmark code, nothing missing", { timeout: 120_000 }, async () => {
  const files = await packedFiles();
  const modules = files.filter((f) => f.startsWith("dist/") && f.endsWith(".js") && !f.startsWith("dist/console/"));
  // Only modules with a source (a stale dist/ may hold files of removed sources).
  const current = (path: string): boolean => existsSync(join(REPO, path.replace(/^dist\//, "src/").replace(/\.js$/, ".ts")));
  const reached = reachable();
  const shippedButUnreached = modules.filter((f) => current(f) && !reached.has(f));
  assert.deepEqual(shippedButUnreached, [], "modules in the package that the program never loads (test or tool code: exclude them in package.json files)");
  const reachedButMissing = [...reached].filter((f) => !modules.includes(f));
  assert.deepEqual(reachedButMissing, [], "modules the program loads that the package lacks");
  for (const f of files) assert.doesNotMatch(f, /_test\.js|\/testing\/|^dist\/e2e\/|\/bench\//, f);
  for (const needed of ["bin/ipsan", "binding.gyp", "src/native/ipsan_io.cc", "package.json", "README.md"]) assert.ok(files.includes(needed), `${needed} is packed`);
  if (existsSync(join(REPO, "dist/console/index.html"))) assert.ok(files.includes("dist/console/index.html"), "the built console is packed");
});

test("the packed tarball installs into an empty prefix and runs: ipsan --version, ipsan demo", { timeout: 600_000 }, async () => {
  const tmp = makeTempDir("pack");
  let demo: IpsanChild | undefined;
  try {
    const packed = await runOk("npm", ["pack", "--ignore-scripts", "--pack-destination", tmp.path], { cwd: REPO, timeoutMs: 120_000 });
    const tarball = join(tmp.path, packed.stdout.trim().split("\n").pop() ?? "");
    const prefix = tmp.file("prefix");
    const installed = await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--prefix", prefix, tarball], { timeoutMs: 540_000 });
    assert.equal(installed.code, 0, describeResult(installed));
    const bin = join(prefix, "node_modules", ".bin", "ipsan");
    const version = await runOk(bin, ["--version"], { timeoutMs: 20_000 });
    const ours = (JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { version: string }).version;
    assert.equal(version.stdout.trim(), `ipsan ${ours}`);
    demo = new IpsanChild(["demo", "--units", "1", "--capacity", "64M", "--data", tmp.file("demo"), "--http", "127.0.0.1:0"], {
      name: "packed-demo",
      logFile: tmp.file("demo.log"),
      bin,
      env: { ...process.env, XDG_CONFIG_HOME: tmp.file("config") },
    });
    await demo.waitForLine(/^ipsan demo units u1 online/, 60_000);
  } finally {
    await demo?.stop("SIGTERM");
    tmp.remove();
  }
});
