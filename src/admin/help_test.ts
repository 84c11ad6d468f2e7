// Issue 9 item 4: every command and subcommand answers --help (or -h) on
// stdout with exit 0, whatever else is on the line; `ipsan --version` too.

import assert from "node:assert/strict";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";

const COMMANDS = [
  "unit",
  "unit volume list",
  "unit volume create",
  "unit volume delete",
  "unit volume grow",
  "unit volume partition",
  "unit volume grant",
  "unit volume wipe",
  "unit format",
  "host",
  "host register",
  "host request",
  "host attach",
  "host detach",
  "host release",
  "host agent",
  "host list",
  "host engine",
  "station",
  "station backup",
  "station restore",
  "demo",
  "units",
  "units identity",
  "volumes",
  "hosts",
  "hosts register",
  "hosts token create",
  "hosts rotate-key",
  "assignments",
  "volume create",
  "volume delete",
  "volume grow",
  "volume partition",
  "volume wipe",
  "tasks",
  "tasks show",
  "tasks cancel",
  "tasks wait",
  "completion",
  "assign",
  "unassign",
  "tokens create",
  "tokens list",
  "tokens revoke",
  "audit verify",
  "audit list",
];

test("--help and -h: usage on stdout, exit 0, for every command and subcommand (even with other arguments)", async () => {
  for (const [i, command] of COMMANDS.entries()) {
    const words = command.split(" ");
    // --help for each; -h and --help after a bad flag on every third (each run is a whole process start).
    const variants = i % 3 === 0 ? [[...words, "--help"], [...words, "-h"], [...words, "--no-such-flag", "x", "--help"]] : [[...words, "--help"]];
    for (const args of variants) {
      const result = await run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 20_000 });
      const line = `ipsan ${args.join(" ")}`;
      assert.equal(result.code, 0, `${line}: exit ${result.code}\n${result.stderr}`);
      assert.equal(result.stderr, "", `${line}: stderr ${result.stderr}`);
      assert.match(result.stdout, /^usage: ipsan /, `${line}: ${result.stdout}`);
      const last = words[words.length - 1] ?? "";
      assert.ok(result.stdout.includes(last), `${line}: the usage does not mention ${last}:\n${result.stdout}`);
    }
  }
});
