// Proves SNMP mode through the real `ipsan station --snmp`: a unit that never
// speaks the discovery protocol (no --station; its control API accepts the
// token the station derives from the cluster key, given to it with
// --control-token-file) is announced by net-snmp's real `snmptrap` (coldStart
// naming the unit and its control address); the station fetches its storage
// info over the control API, lists it online with its volumes, allocates on it
// (the unit's grant shows the host), and a linkDown trap marks it down. A trap
// never speaks for an enrolled unit (issue 7): a linkDown does not mark it
// down, and a coldStart naming it never makes the station send a token to the
// control address the trap names.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { OID } from "../discovery/snmp.ts";
import { controlTokenFor, parseClusterKey } from "../discovery/keys.ts";
import { run, waitFor } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { controlRequest } from "../testing/control.ts";
import { joinArgs, type Assignment } from "./pool_harness.ts";

const COMMUNITY = "ipsan-test";
const tmp = makeTempDir("snmp-station");
let station: RunningStation;
let unit: RunningUnit;
let token = "";

before(async () => {
  station = await startStation({ extraArgs: ["--snmp", "127.0.0.1:0", "--snmp-community", COMMUNITY] });
  const key = parseClusterKey(await readFile(station.clusterKeyFile(), "utf8"), "cluster.key");
  token = controlTokenFor(key, "trapunit");
  writeFileSync(tmp.file("token"), `${token}\n`, { mode: 0o600 });
  unit = await startUnit({
    name: "trapunit",
    capacity: "128M",
    control: true,
    volumes: [{ name: "t1", size: "16M" }],
    extraArgs: ["--control-token-file", tmp.file("token")],
  });
});
after(async () => {
  await unit?.close();
  await station?.close();
  tmp.remove();
});

async function trap(trapOid: string, varbinds: string[]): Promise<void> {
  const address = await waitFor("the station's SNMP address", () => station.snmp(), { timeoutMs: 5_000 });
  const result = await run("snmptrap", ["-v", "2c", "-c", COMMUNITY, `${address.host}:${address.port}`, "", trapOid, ...varbinds], {
    timeoutMs: 10_000,
    env: { SNMP_PERSISTENT_DIR: tmp.file("snmp-persist") },
  });
  assert.equal(result.code, 0, result.stderr);
}

test("a coldStart trap brings a unit into the pool; allocation works on it; linkDown marks it down", async () => {
  const control = new URL(unit.controlUrl ?? "");
  await trap(OID.coldStart, [OID.ipsanUnitName0, "s", "trapunit", OID.ipsanUnitControl0, "s", `${control.hostname}:${control.port}`]);
  const listed = await waitFor(
    "trapunit online with its volume",
    async () => {
      const response = await station.api("GET", "/api/v1/units/trapunit");
      const body = response.body as { state: string; volumes: { name: string }[] } | undefined;
      return response.status === 200 && body?.state === "online" && body.volumes.some((v) => v.name === "t1") ? body : undefined;
    },
    { timeoutMs: 10_000 },
  );
  assert.equal(listed.volumes.length, 1);

  const answer = await station.api("POST", "/api/v1/allocations", { requestId: "snmp-1", host: "snmphost", sizeBytes: "8M", address: "127.0.0.6" });
  assert.equal(answer.status, 201, answer.text);
  const assignment = answer.body as Assignment;
  assert.equal(assignment.unit, "trapunit");
  assert.equal(assignment.volume, "t1", "the free volume is reused");
  const onUnit = await controlRequest(unit, "GET", "/v1/volumes/t1", undefined, token);
  assert.deepEqual((onUnit.body as { grants: string[] }).grants, ["127.0.0.6"]);

  await trap(OID.linkDown, [OID.ipsanUnitName0, "s", "trapunit"]);
  await waitFor(
    "trapunit down",
    async () => ((await station.api("GET", "/api/v1/units/trapunit")).body as { state: string }).state === "down" || undefined,
    { timeoutMs: 5_000 },
  );
  const metrics = (await station.api("GET", "/metrics")).text;
  assert.match(metrics, /snmp/);
});

test("traps never speak for an enrolled unit: no linkDown, no control fetch to the address a trap names", async () => {
  const enrolled = await startUnit({ name: "enrolled1", capacity: "64M", control: true, volumes: [{ name: "e1", size: "4M" }], extraArgs: joinArgs(station) });
  const requests: string[] = [];
  const capture = createServer((request, response) => {
    requests.push(`${request.method} ${request.url} ${request.headers.authorization ?? ""}`);
    response.writeHead(500).end();
  });
  await new Promise<void>((resolve) => capture.listen(0, "127.0.0.1", resolve));
  try {
    const state = async (): Promise<string | undefined> => ((await station.api("GET", "/api/v1/units/enrolled1")).body as { state?: string }).state;
    await waitFor("enrolled1 online and enrolled", async () => {
      const identity = await station.api("GET", "/api/v1/units/enrolled1/identity");
      return (await state()) === "online" && (identity.body as { state?: string }).state === "enrolled" ? true : undefined;
    }, { timeoutMs: 10_000 });
    await trap(OID.linkDown, [OID.ipsanUnitName0, "s", "enrolled1"]);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(await state(), "online", "a linkDown trap does not mark an enrolled unit down");
    await enrolled.stop();
    await waitFor("enrolled1 down after its SHUTDOWN", async () => ((await state()) === "down" ? true : undefined), { timeoutMs: 5_000 });
    const address = capture.address() as { port: number };
    await trap(OID.coldStart, [OID.ipsanUnitName0, "s", "enrolled1", OID.ipsanUnitControl0, "s", `127.0.0.1:${address.port}`]);
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    assert.deepEqual(requests, [], "the station sent nothing (no token) to the address the trap named");
    assert.equal(await state(), "down", "the trap did not bring it back");
  } finally {
    capture.close();
    await enrolled.close();
  }
});
