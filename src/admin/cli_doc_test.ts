// Issue 9 item 2: docs/cli.md is the table of every flag with its one
// meaning. This keeps it whole: every flag that any command's --help lists
// (its usage and its "flags:" section) is in one of the document's tables.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { IPSAN_BIN, REPO_ROOT } from "../testing/unit.ts";

/** One command of each flag set (subcommands of one family share theirs). */
const COMMANDS = [
  "unit", "unit volume list", "unit format", "station", "station migrate", "demo",
  "host register", "host request", "host attach", "host detach", "host release", "host agent", "host list", "host engine",
  "units", "units identity", "volumes", "hosts", "hosts register", "hosts token create", "hosts rotate-key", "assignments",
  "volume create", "tasks", "assign", "unassign", "tokens create", "audit list",
];

test("every flag a command's --help lists is in docs/cli.md", { timeout: 120_000 }, async () => {
  const doc = readFileSync(join(REPO_ROOT, "docs", "cli.md"), "utf8");
  const tableRows = doc.split("\n").filter((line) => line.startsWith("|")).join("\n");
  const missing = new Map<string, string[]>();
  const seen = new Set<string>();
  for (const command of COMMANDS) {
    const result = await run(process.execPath, [IPSAN_BIN, ...command.split(" "), "--help"], { timeoutMs: 20_000 });
    assert.equal(result.code, 0, `ipsan ${command} --help: ${result.stderr}`);
    for (const [flag] of result.stdout.matchAll(/(?<![\w-])--[a-z][a-z0-9-]*/g)) {
      seen.add(flag);
      if (new RegExp(`\`${flag}(?![a-z0-9-])`).test(tableRows)) continue;
      missing.set(flag, [...(missing.get(flag) ?? []), command]);
    }
  }
  assert.ok(seen.size >= 60, `only ${seen.size} flags read from the --help texts: ${[...seen].join(" ")}`);
  assert.deepEqual(Object.fromEntries(missing), {}, "flags in --help but in no table of docs/cli.md");
});
