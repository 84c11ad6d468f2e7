// Runs the compiled test files (dist/**/*_test.js) with node's test runner.
// Usage: node scripts/test.mjs [SUBSTRING...]   (only files whose path contains one)
// IPSAN_TEST_CONCURRENCY sets how many test files run at once (default 2).
import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";

function walk(dir, out) {
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) walk(path, out);
    else if (path.endsWith("_test.js")) out.push(path);
  }
  return out;
}

const filters = process.argv.slice(2);
const files = walk("dist", [])
  .filter((file) => filters.length === 0 || filters.some((f) => file.includes(f)))
  .sort();
if (files.length === 0) {
  console.error(`no test files match ${JSON.stringify(filters)}`);
  process.exit(1);
}
const concurrency = process.env.IPSAN_TEST_CONCURRENCY ?? "2";
// Hermetic CLI settings: no config file of the machine's user (~/.config/ipsan/config) and no
// IPSAN_STATION & co. from the caller's shell reach the commands the tests run (src/util/config.ts).
const configHome = mkdtempSync(join(tmpdir(), "ipsan-test-config-"));
const env = { ...process.env, UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? "16", XDG_CONFIG_HOME: configHome };
for (const name of ["IPSAN_CONFIG", "IPSAN_STATION", "IPSAN_TOKEN_FILE", "IPSAN_CA_FILE", "IPSAN_STATE_DIR", "IPSAN_HOST"]) delete env[name];
const result = spawnSync(process.execPath, ["--test", `--test-concurrency=${concurrency}`, "--test-reporter=spec", ...files], { stdio: "inherit", env });
rmSync(configHome, { recursive: true, force: true });
process.exit(result.status ?? 1);
