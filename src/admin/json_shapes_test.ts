// Issue 9 item 11: --json everywhere with one shape. Every listing command,
// run as a user would against a real station and a real joined unit, prints
// {"items": [...]} and nothing else on stdout (`ipsan hosts --json` used to
// print a bare array while `ipsan host list --json` printed {"items": ...}).
// And the exit statuses docs/cli.md promises: 2 for what the CLI itself finds
// wrong, 1 for a refusal by the station (a size it rejects among them).

import assert from "node:assert/strict";
import { test } from "node:test";
import { describeResult, run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";

test("every listing prints {items: [...]} with --json; exit statuses 0, 1 and 2", { timeout: 120_000 }, async () => {
  const station = await startStation({});
  const dir = makeTempDir("json-shapes");
  try {
    const unit = await startJoinedUnit(station, { name: "u1", capacity: "256M", volumes: [{ name: "v1", size: "16M" }] });
    try {
      const admin = ["--station", station.url, "--token-file", `${station.dataDir}/admin.token`];
      const ipsan = (...args: string[]) => run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 30_000 });
      // Something in every listing: a host, an assignment, a token, a task, audit entries.
      assert.equal((await ipsan("hosts", "register", "h1", "--address", "127.0.0.1", ...admin)).code, 0);
      assert.equal((await ipsan("assign", "h1", "u1", "v1", ...admin)).code, 0);
      assert.equal((await ipsan("tokens", "create", "--name", "reader", "--role", "viewer", ...admin)).code, 0);
      assert.equal((await ipsan("volume", "create", "u1", "w1", "8M", ...admin)).code, 0);
      assert.equal((await ipsan("volume", "wipe", "u1", "w1", ...admin)).code, 0);

      const listings: [string[], number][] = [
        [["units", ...admin], 1],
        [["volumes", ...admin], 2],
        [["hosts", ...admin], 1],
        [["assignments", ...admin], 1],
        [["tokens", "list", ...admin], 1],
        [["tasks", ...admin], 1],
        [["audit", "list", ...admin], 1],
        [["host", "list", "--state-dir", dir.path], 0],
        [["unit", "volume", "list", "--control", unit.controlUrl ?? "", "--token-file", `${unit.dataDir}/control.token`], 2],
      ];
      for (const [args, atLeast] of listings) {
        const result = await ipsan(...args, "--json");
        assert.equal(result.code, 0, describeResult(result));
        const parsed = JSON.parse(result.stdout) as Record<string, unknown>;
        assert.deepEqual(Object.keys(parsed), ["items"], `ipsan ${args[0]} ${args[1]} --json: ${result.stdout.slice(0, 200)}`);
        assert.ok(Array.isArray(parsed["items"]) && parsed["items"].length >= atLeast, `ipsan ${args.join(" ")}: ${parsed["items"]}`);
      }

      // The old shape stays available while scripts move to .items (the contract's alias).
      const old = await run(process.execPath, [IPSAN_BIN, "hosts", ...admin, "--json"], { timeoutMs: 30_000, env: { IPSAN_JSON_LISTS: "array" } });
      assert.equal(old.code, 0, describeResult(old));
      assert.deepEqual((JSON.parse(old.stdout) as { name: string }[]).map((h) => h.name), ["h1"]);

      // One object for one thing, and for what was done.
      const deleted = await ipsan("volume", "delete", "u1", "w1", "--json", ...admin);
      assert.deepEqual(JSON.parse(deleted.stdout), { unit: "u1", name: "w1", deleted: true });
      const revoked = await ipsan("tokens", "revoke", "reader", "--json", ...admin);
      assert.deepEqual(JSON.parse(revoked.stdout), { name: "reader", revoked: true });

      // Exit statuses: 2 for what the CLI itself finds wrong, naming it ...
      const usage: [string[], RegExp][] = [
        [["volume", "create", "u1", "x", "lots", ...admin], /SIZE: invalid size "lots"/],
        [["host", "request", ...admin, "--host", "h1", "--size", "1000", "--state-dir", dir.path], /--size: "1000" must be a positive multiple of 512 bytes/],
        [["units", "--bogus", ...admin], /bogus/],
      ];
      for (const [args, pattern] of usage) {
        const result = await ipsan(...args);
        assert.equal(result.code, 2, describeResult(result));
        assert.match(result.stderr, pattern);
      }
      // ... 1 for a refusal by the station, a size it rejects among them.
      const refused: [string[], RegExp][] = [
        [["volume", "create", "u1", "x", "1000", ...admin], /400 INVALID_ARGUMENT: sizeBytes: size 1000 \(1000 bytes\) is not a multiple of 512/],
        [["volume", "grow", "u1", "v1", "8M", ...admin], /POST \/api\/v1\/volumes\/u1\/v1\/grow: [0-9]{3} [A-Z_]+: /],
        [["host", "request", ...admin, "--host", "h1", "--size", "64G", "--state-dir", dir.path], /507 NO_SPACE/],
        [["volume", "create", "ghost", "x", "1M", ...admin], /404 NOT_FOUND: unit "ghost" not found/],
      ];
      for (const [args, pattern] of refused) {
        const result = await ipsan(...args);
        assert.equal(result.code, 1, describeResult(result));
        assert.match(result.stderr, pattern);
      }
    } finally {
      await unit.close();
    }
  } finally {
    dir.remove();
    await station.close();
  }
});
