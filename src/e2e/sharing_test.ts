// Storage sharing (seed "Storage Sharing", Fig. 6): many hosts on one unit,
// each with exclusive volumes, enforced by the unit. One unit joins a
// station; host A registers data-path address 127.0.0.2 and host B 127.0.0.3,
// and each asks for a volume (both land on the only unit). A raw NBD client
// bound to each source address (libnbd cannot bind one) shows: A opens its
// volume, writes and flushes; B is refused on A's volume while A's connection
// stays open; A reads its bytes back on that same connection; B opens and
// writes its own volume without touching A's; A is refused on B's volume;
// and a third address (127.0.0.1, nbdinfo, a real client) gets neither.
// After A's assignment is released (`ipsan host release`), A is refused too.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import type { Assignment } from "../host/station_client.ts";
import { run } from "../testing/process.ts";
import { San } from "./harness.ts";
import { openExport, type OpenResult } from "./nbd_probe.ts";

function open(a: Assignment, localAddress: string): Promise<OpenResult> {
  return openExport({ host: a.nbdHost, port: a.nbdPort, localAddress, exportName: a.export });
}

test("sharing: two hosts on one unit, each refused on the other's volume", { timeout: 90_000 }, async () => {
  const san = new San("sharing");
  try {
    const station = await san.startStation();
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const request = async (host: string, address: string): Promise<Assignment> =>
      (
        await san.host([
          "request", "--station", station.apiUrl, "--token-file", station.tokenFile,
          "--host", host, "--address", address, "--size", "16M", "--json",
        ])
      ).json as Assignment;
    const a = await request("hostA", "127.0.0.2");
    const b = await request("hostB", "127.0.0.3");
    assert.equal(a.unit, "u1");
    assert.equal(b.unit, "u1");
    assert.notEqual(a.export, b.export);
    assert.equal(a.hostAddress, "127.0.0.2");
    assert.equal(b.hostAddress, "127.0.0.3");

    const aOnA = await open(a, "127.0.0.2");
    assert.equal(aOnA.kind, "open", `host A opens its volume: ${JSON.stringify(aOnA)}`);
    if (aOnA.kind !== "open") return;
    assert.equal(aOnA.sizeBytes, 16 * 1024 * 1024);
    const patternA = randomBytes(64 * 1024);
    await aOnA.client.write(0, patternA);
    await aOnA.client.flush();

    const bOnA = await open(a, "127.0.0.3");
    assert.notEqual(bOnA.kind, "open", "host B must be refused on host A's volume");
    assert.ok((await aOnA.client.read(0, patternA.length)).equals(patternA), "A still works, on the same connection");

    const bOnB = await open(b, "127.0.0.3");
    assert.equal(bOnB.kind, "open", `host B opens its own volume: ${JSON.stringify(bOnB)}`);
    if (bOnB.kind !== "open") return;
    await bOnB.client.write(0, randomBytes(64 * 1024));
    await bOnB.client.flush();
    bOnB.client.close();
    assert.ok((await aOnA.client.read(0, patternA.length)).equals(patternA), "B's writes did not touch A's volume");

    const aOnB = await open(b, "127.0.0.2");
    assert.notEqual(aOnB.kind, "open", "host A must be refused on host B's volume");
    const strangerOnA = await open(a, "127.0.0.1");
    assert.notEqual(strangerOnA.kind, "open", "an address with no grant is refused");
    const nbdinfo = await run("nbdinfo", ["--size", a.uri], { timeoutMs: 15_000 });
    assert.notEqual(nbdinfo.code, 0, `nbdinfo from 127.0.0.1 must fail on A's volume: ${nbdinfo.stdout}`);
    aOnA.client.close();

    await san.host([
      "release", "--station", station.apiUrl, "--token-file", station.tokenFile, "--host", "hostA",
      "--assignment", String(a.id), "--state-dir", san.tmp.file("state-a"),
    ]);
    const afterRelease = await open(a, "127.0.0.2");
    assert.notEqual(afterRelease.kind, "open", "after release, host A's grant is revoked");
  } finally {
    await san.close();
  }
});
