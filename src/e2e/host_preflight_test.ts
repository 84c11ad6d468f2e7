// Issue 9 item 7, the host side: before `ipsan host attach` attaches, and
// before `ipsan host request` prints a command to use the volume, the host
// opens the export as its client will. When the unit refuses (this machine is
// not the address the grant names), it says so with the peer the unit saw,
// the address granted, and how to proceed; following that advice works.
// A real station and unit; the host "far" is registered at 127.0.0.5 while
// this machine connects from 127.0.0.1 (a loopback alias: no netns needed).

import assert from "node:assert/strict";
import { test } from "node:test";
import { describeResult, run, waitFor } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";

test("a host whose address is not the one granted is told why and how to proceed, before any command", { timeout: 120_000 }, async () => {
  const station = await startStation({});
  const dir = makeTempDir("host-preflight");
  try {
    const unit = await startJoinedUnit(station, { name: "u1", capacity: "256M" });
    try {
      const admin = ["--station", station.url, "--token-file", `${station.dataDir}/admin.token`];
      const ipsan = (...args: string[]) => run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 30_000 });
      assert.equal((await ipsan("hosts", "register", "far", "--address", "127.0.0.5", ...admin)).code, 0);
      const state = dir.file("far-state");

      // request: the volume is assigned (exit 0, the JSON as always), with a note instead of a command that cannot work.
      const requested = await ipsan("host", "request", ...admin, "--host", "far", "--size", "16M", "--state-dir", state);
      assert.equal(requested.code, 0, describeResult(requested));
      const id = /^assignment (\S+) /.exec(requested.stdout)?.[1] ?? "";
      const exportName = /gets volume (\S+) /.exec(requested.stdout)?.[1] ?? "";
      assert.ok(id !== "" && exportName !== "", requested.stdout);
      assert.doesNotMatch(requested.stdout, /use it:/);
      assert.match(requested.stdout, /not usable from this machine \(see the note on stderr\)/);
      const explanation =
        `unit u1 refuses this host (peer 127.0.0.1) for export ${exportName}: the grant is for 127.0.0.5 (the address the station has for host far). ` +
        "To proceed: run it on the machine at 127.0.0.5, or, if this machine is host far, record the address its NBD connections come from: " +
        "ipsan hosts register far --address 127.0.0.1 (or ipsan host request ... --address 127.0.0.1); the station then grants that address";
      assert.ok(requested.stderr.includes(`ipsan host request: note: the volume is assigned, but from this machine: ${explanation}`), requested.stderr);
      // With --json: the assignment alone on stdout, as always; the note on stderr.
      const asJson = await ipsan("host", "request", ...admin, "--host", "far", "--size", "16M", "--state-dir", state, "--json");
      assert.equal(asJson.code, 0, describeResult(asJson));
      assert.equal((JSON.parse(asJson.stdout) as { host: string }).host, "far");
      assert.match(asJson.stderr, /note: the volume is assigned, but from this machine: unit u1 refuses this host \(peer 127\.0\.0\.1\) for export \S+: the grant is for 127\.0\.0\.5/);
      // The real client agrees: nbdinfo from this machine is refused.
      const uri = /^uri (\S+)$/m.exec(requested.stdout)?.[1] ?? "";
      const nbdinfo = await run("nbdinfo", [uri], { timeoutMs: 20_000 });
      assert.notEqual(nbdinfo.code, 0, describeResult(nbdinfo));

      // attach: refused before nbdfuse or nbd-client starts, exit 1, the same explanation; nothing recorded.
      const attached = await ipsan("host", "attach", ...admin, "--host", "far", "--assignment", id, "--mode", "nbd", "--state-dir", state);
      assert.equal(attached.code, 1, describeResult(attached));
      assert.equal(attached.stderr, `ipsan host: ${explanation}\n`);
      assert.deepEqual(JSON.parse((await ipsan("host", "list", "--state-dir", state, "--json")).stdout), { items: [] });

      // Following the advice works: the station grants 127.0.0.1 and the attach goes through.
      assert.equal((await ipsan("hosts", "register", "far", "--address", "127.0.0.1", ...admin)).code, 0);
      const ok = await waitFor(
        "the attach admitted once the unit has the new grant",
        async () => {
          const again = await ipsan("host", "attach", ...admin, "--host", "far", "--assignment", id, "--mode", "nbd", "--state-dir", state, "--json");
          return again.code === 0 ? again : undefined;
        },
        { timeoutMs: 20_000, intervalMs: 500 },
      );
      assert.equal((JSON.parse(ok.stdout) as { uri: string }).uri, uri);

      // A host at this machine's address: no note, the command to use it.
      assert.equal((await ipsan("hosts", "register", "near", "--address", "127.0.0.1", ...admin)).code, 0);
      const near = await ipsan("host", "request", ...admin, "--host", "near", "--size", "16M", "--state-dir", dir.file("near-state"));
      assert.equal(near.code, 0, describeResult(near));
      assert.match(near.stdout, /\nuse it: nbdinfo nbd:\/\/127\.0\.0\.1:[0-9]+\/\S+ +or: ipsan host attach \.\.\. --assignment \S+\n$/);
      assert.equal(near.stderr.includes("note:"), false, near.stderr);

      // A unit that cannot be reached is not a refusal: attach goes on (--mode nbd records the URI; a client meets the outage).
      const nearId = /^assignment (\S+) /.exec(near.stdout)?.[1] ?? "";
      await unit.stop();
      const unreachable = await ipsan("host", "attach", ...admin, "--host", "near", "--assignment", nearId, "--mode", "nbd", "--state-dir", dir.file("near-state"), "--json");
      assert.equal(unreachable.code, 0, describeResult(unreachable));
      assert.doesNotMatch(unreachable.stderr, /refuses/);
    } finally {
      await unit.close();
    }
  } finally {
    dir.remove();
    await station.close();
  }
});
