// Proves the admin CLI against a real station and a real unit joined to it,
// by running `bin/ipsan` as a user would: listings print tables and, with
// --json, the same items the API returns; volume create, partition, grow and
// delete change the unit (checked on the unit's own control API); assign gives
// a host a partition and unassign revokes the unit's grant. Usage errors exit
// 2 with a message naming the flag or argument; a refusal by the station exits
// 1 with its message (naming the unknown unit, the taken volume).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { run, type CommandResult } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "../station/harness.ts";
import { startJoinedUnit, unitVolume, unitVolumes } from "../station/pool_harness.ts";
import { legCell } from "./main.ts";

let station: RunningStation;
let unit: RunningUnit;

before(async () => {
  station = await startStation();
  unit = await startJoinedUnit(station, { name: "adm1", capacity: "128M", volumes: [{ name: "base", size: "8M" }] });
});
after(async () => {
  await unit?.close();
  await station?.close();
});

function ipsan(args: readonly string[], env: Record<string, string> = {}): Promise<CommandResult> {
  return run(process.execPath, [IPSAN_BIN, ...args], {
    timeoutMs: 30_000,
    env: { IPSAN_STATION: station.url, IPSAN_TOKEN_FILE: `${station.dataDir}/admin.token`, ...env },
  });
}

async function ok(args: readonly string[]): Promise<string> {
  const result = await ipsan(args);
  assert.equal(result.code, 0, `ipsan ${args.join(" ")}: ${result.stdout}${result.stderr}`);
  return result.stdout;
}

test("listings: tables, and --json equal to the API's items", async () => {
  const table = await ok(["units"]);
  assert.match(table, /^NAME +STATE +ADDRESS +NBD +CAPACITY +FREE +VOLUMES +SEEN +SPARE +ZONE\n/);
  assert.match(table, /\nadm1 +online +127\.0\.0\.1 +127\.0\.0\.1:[0-9]+ +124M +.* +- +-\n/);
  const json = (JSON.parse(await ok(["units", "--json"])) as { items: { name: string }[] }).items;
  const api = (await station.api("GET", "/api/v1/units")).body as { items: { name: string }[] };
  assert.deepEqual(json.map((u) => u.name), api.items.map((u) => u.name));
  assert.match(await ok(["volumes"]), /\nadm1 +base +1 +8M +[0-9]+-[0-9]+ +- +-\n/);
  assert.deepEqual(JSON.parse(await ok(["volumes", "--json", "--free"])).items.map((v: { id: string }) => v.id), ["adm1/base"]);
  assert.match(await ok(["hosts"]), /^NAME +ADDRESS +STATE +SEEN +SPARE +IQN\n$/);
  assert.deepEqual(JSON.parse(await ok(["assignments", "--json"])), { items: [] });
});

test("volume create, partition, grow and delete change the unit", async () => {
  assert.match(await ok(["volume", "create", "adm1", "cli1", "16M"]), /\nadm1 +cli1 +2 +16M /);
  assert.equal((await unitVolume(unit, "cli1")).sizeBytes, 16 * 1024 * 1024);
  assert.match(await ok(["volume", "partition", "adm1", "cli1", "4M,4M"]), /\ncli1\/p2 +8192 +16383 +4M\n/);
  assert.equal((await unitVolume(unit, "cli1")).partitions.length, 2);
  const grown = JSON.parse(await ok(["volume", "grow", "adm1", "cli1", "24M", "--json"])) as { sizeBytes: number };
  assert.equal(grown.sizeBytes, 24 * 1024 * 1024);
  assert.equal((await unitVolume(unit, "cli1")).sizeBytes, 24 * 1024 * 1024);
  assert.match(await ok(["volume", "partition", "adm1", "cli1", "none"]), /has no partitions/);
  assert.match(await ok(["volume", "delete", "adm1", "cli1"]), /deleted volume adm1\/cli1/);
  assert.equal((await unitVolumes(unit)).some((v) => v.name === "cli1"), false);
});

test("assign a partition to a host, then unassign: the unit's grant follows", async () => {
  assert.equal((await station.api("PUT", "/api/v1/hosts/clihost", { address: "127.0.0.7" })).status, 201);
  assert.equal((await station.api("PUT", "/api/v1/hosts/clispare", { address: "127.0.0.8", spare: true })).status, 201);
  assert.match(await ok(["hosts"]), /\nclihost +127\.0\.0\.7 +online +\S+ +- +-\nclispare +127\.0\.0\.8 +online +\S+ +spare +-\n/);
  await ok(["volume", "partition", "adm1", "base", "4M,4M"]);
  const out = await ok(["assign", "clihost", "adm1", "base", "--partition", "2"]);
  const id = /^assignment (a-[0-9a-f]+): host clihost \(127\.0\.0\.7\) gets adm1\/base\/p2, 4M, LBA [0-9]+-[0-9]+\nuri nbd:\/\/127\.0\.0\.1:[0-9]+\/base\/p2\n$/.exec(out)?.[1];
  assert.ok(id !== undefined, out);
  assert.deepEqual((await unitVolume(unit, "base")).grants, ["127.0.0.7"]);
  assert.match(await ok(["assignments"]), new RegExp(`\\n${id} +clihost +127\\.0\\.0\\.7 +adm1 +base/p2 +4M +active +nbd://`));
  const taken = await ipsan(["assign", "other", "adm1", "base"]);
  assert.equal(taken.code, 1);
  assert.match(taken.stderr, /host "other" not found/);
  assert.match(await ok(["unassign", id]), /the unit revoked the grant/);
  assert.deepEqual((await unitVolume(unit, "base")).grants, []);
  assert.match(await ok(["assignments", "--all"]), new RegExp(`\\n${id} .* released `));
});

test("usage errors exit 2 naming what was wrong; station refusals exit 1 with its message", async () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [["units"], { IPSAN_STATION: "" }, /--station URL is required/],
    [["units"], { IPSAN_TOKEN_FILE: "" }, /--token-file FILE is required/],
    [["units", "--station", "ftp://x"], {}, /--station: unsupported scheme/],
    [["units", "--token-file", "/nonexistent/token"], {}, /--token-file: cannot read "\/nonexistent\/token"/],
    [["units", "extra"], {}, /unexpected argument "extra"/],
    [["units", "--bogus"], {}, /bogus/],
    [["volume"], {}, /missing action/],
    [["volume", "explode", "a", "b"], {}, /unknown action "explode"/],
    [["volume", "create", "adm1", "x"], {}, /missing SIZE/],
    [["volume", "create", "adm1", "x", "lots"], {}, /SIZE: invalid size "lots"/],
    [["volume", "create", "adm 1", "x", "1M"], {}, /UNIT: invalid name "adm 1"/],
    [["volume", "partition", "adm1", "base", "1M,zz"], {}, /SIZE #2: invalid size "zz"/],
    [["assign", "h", "u"], {}, /missing VOLUME/],
    [["assign", "h", "u", "v", "--partition", "0"], {}, /--partition: invalid partition number "0"/],
    [["unassign"], {}, /missing ID/],
  ];
  for (const [args, env, pattern] of cases) {
    const result = await ipsan(args, env);
    assert.equal(result.code, 2, `ipsan ${args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, pattern);
  }
  const noUnit = await ipsan(["volume", "create", "ghost", "v", "1M"]);
  assert.equal(noUnit.code, 1);
  assert.match(noUnit.stderr, /404 NOT_FOUND: unit "ghost" not found/);
  const badToken = await ipsan(["units"], { IPSAN_TOKEN_FILE: `${station.dataDir}/cluster.key` });
  assert.equal(badToken.code, 1);
  assert.match(badToken.stderr, /401 UNAUTHENTICATED/);
  const notMultiple = await ipsan(["volume", "create", "adm1", "v", "1000"]);
  assert.equal(notMultiple.code, 1);
  assert.match(notMultiple.stderr, /sizeBytes: size 1000 \(1000 bytes\) is not a multiple of 512/);
});

test("the LEGS column: each leg's unit and state, with a rebuild's progress", () => {
  assert.equal(legCell({ unit: "u1", state: "in-sync", rebuild: null }), "u1:in-sync");
  assert.equal(legCell({ unit: "u3", state: "rebuilding", rebuild: { copiedBytes: 42, totalBytes: 100 } }), "u3:rebuilding 42%");
  assert.equal(legCell({ unit: "u3", state: "rebuilding" }), "u3:rebuilding");
});
