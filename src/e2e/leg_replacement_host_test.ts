// Issue 6's proof "a unit that never returns", the whole chain with real
// processes: a station with `--replace-after 2s`, units u1 and u2 and a
// spare sp, `ipsan host request --copies 2`, `attach --mode nbd` (the mirror
// engine) and `ipsan host agent`. fio randwrite with crc32c verify runs
// through the engine while one leg's unit is killed for good: the station
// places a replacement leg on the spare, the agent rewrites the engine's
// legs file and sends SIGHUP, the engine rebuilds the new leg in full while
// fio writes, and the agent reports it in sync (the station shows the leg
// in-sync). fio finishes with zero errors; after detach the survivor and the
// new leg are byte-identical (qemu-img compare on the units' exports, over
// NBD TLS with the host's keys: qemu takes them as tls-creds-psk); then
// the survivor's unit is killed too and the volume's data is all on the new
// leg, read from the spare's own export.
//
// The station's part (spares, --replace-after, leg reports) is another
// helper's work merged beside this one: on a station without
// --replace-after this test says so and is skipped.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { IpsanChild } from "../demo/child.ts";
import { exportSha256 } from "../testing/mirror_bed.ts";
import { adminLocalUri, qemuCompareArgs } from "../testing/tls_uri.ts";
import { childEnv, describeResult, run, waitFor } from "../testing/process.ts";
import { describeFio, fio, San, type UnitProcess, verifyJob } from "./harness.ts";

const MIB = 1024 * 1024;
const SIZE = 32 * MIB;
/** Fast liveness (read by the station and the units) so a killed unit is offline within ~3 s. */
const FAST_DISCOVERY = { IPSAN_DISCOVERY_HEARTBEAT_MS: "250", IPSAN_DISCOVERY_SUSPECT_MS: "1000", IPSAN_DISCOVERY_OFFLINE_MS: "3000" };
const REPLACE_AFTER = "2s";
const FIO_WRITE_S = 14;
const WAIT_MS = 40_000;

interface Leg {
  unit: string;
  volume: string;
  uri: string;
  state: string;
  index?: number;
}
interface Mirror {
  id: string;
  legs: Leg[];
}


test("a unit that never returns: the station puts the leg on a spare, the agent and engine rebuild it while fio writes; identical legs; the data all on the new leg", { timeout: 240_000 }, async (t: TestContext) => {
  for (const [key, value] of Object.entries(FAST_DISCOVERY)) process.env[key] = value;
  const san = new San("legrepl");
  let agent: IpsanChild | undefined;
  try {
    // The station with --replace-after (started here: the harness's station takes no extra flags in every branch).
    const dataDir = san.tmp.file("station");
    const child = new IpsanChild(["station", "--data", dataDir, "--http", "127.0.0.1:0", "--discovery", "127.0.0.1:0", "--replace-after", REPLACE_AFTER], {
      name: "station",
      logFile: san.log("station"),
      env: childEnv(),
    });
    const apiUrl = (await child.waitForLine(/^ipsan station ready (http:\/\/\S+)/, 20_000))[1] ?? "";
    const discovery = (await child.waitForLine(/^ipsan station discovery udp:\/\/(\S+)/, 20_000))[1] ?? "";
    san.station = { child, apiUrl, discovery, dataDir, tokenFile: join(dataDir, "admin.token"), keyFile: join(dataDir, "cluster.key") };
    await san.startUnit("u1", { capacity: "128M" });
    await san.startUnit("u2", { capacity: "128M" });
    await san.startUnit("sp", { capacity: "128M", extraArgs: ["--spare"] });
    await san.waitUnits(["u1", "u2", "sp"]);
    const stateDir = san.tmp.file("host-state");
    const common = ["--station", apiUrl, "--token-file", san.station.tokenFile, "--host", "h1"];

    const mirror = (await san.host(["request", ...common, "--size", "32M", "--copies", "2", "--state-dir", stateDir, "--json"])).json as Mirror;
    assert.deepEqual(mirror.legs.map((l) => l.unit).sort(), ["u1", "u2"], "ordinary allocation does not use the spare");
    const attached = (await san.host(["attach", ...common, "--assignment", mirror.id, "--mode", "nbd", "--state-dir", stateDir, "--json"])).json as { uri: string };
    agent = new IpsanChild(["host", "agent", ...common, "--heartbeat-ms", "200", "--state-dir", stateDir], { name: "agent", logFile: san.log("agent"), env: childEnv() });
    await agent.waitForLine(/^ipsan host agent h1 running/, 10_000);

    let fioDone = false;
    const fioRun = fio("replace-chain", attached.uri, verifyJob(SIZE, FIO_WRITE_S)).finally(() => {
      fioDone = true;
    });
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    const dead = mirror.legs[1] as Leg;
    const survivor = mirror.legs[0] as Leg;
    const deadUnit = san.units.get(dead.unit) as UnitProcess;
    deadUnit.child.signal("SIGKILL");
    await deadUnit.child.exited;
    const client = await san.client();
    const killedAt = Date.now();
    // The station replaces the leg (on the spare, same index); the agent and engine rebuild it; the agent reports it in sync.
    const replaced = await waitFor(
      "the replacement leg on sp reported in-sync",
      async () => {
        const now = (await client.call("GET", `/api/v1/assignments/${mirror.id}`)) as Mirror;
        const leg = now.legs[1];
        return leg !== undefined && leg.unit === "sp" && leg.state === "in-sync" ? now : undefined;
      },
      { timeoutMs: WAIT_MS, intervalMs: 200 },
    );
    t.diagnostic(`leg 1 replaced on sp and reported in sync ${Date.now() - killedAt} ms after ${dead.unit} was killed`);
    assert.equal(fioDone, false, "fio was still running while the new leg was rebuilt");
    const fioResult = await fioRun;
    assert.equal(fioResult.result.code, 0, describeFio(fioResult));
    assert.equal(fioResult.totalErrors, 0, describeFio(fioResult));
    const agentLog = readFileSync(san.log("agent"), "utf8");
    assert.match(agentLog, /mirror legs changed at the station: engine told/);
    const engineLog = readFileSync(join(stateDir, "log", `${mirror.id}.engine.log`), "utf8");
    assert.match(engineLog, /mirror leg rebuild started .*kind=full/, "the new leg got a full rebuild");

    const viaEngine = await exportSha256(attached.uri, SIZE, san.tmp.file("engine.img"));
    await agent.stop("SIGTERM");
    agent = undefined;
    await san.host(["detach", "--assignment", mirror.id, "--state-dir", stateDir]);
    // The survivor's URI (from `request --json`) carries the host's key file; the new leg's, as the
    // station answers it (nbds://h1@sp...), gets the host's key for sp fetched with the admin token.
    const newLeg = replaced.legs[1] as Leg;
    newLeg.uri = await adminLocalUri(client, newLeg.uri, newLeg.unit, san.tmp.file("admin-keys"));
    const compare = await run("qemu-img", qemuCompareArgs(survivor.uri, newLeg.uri), { timeoutMs: 60_000 });
    assert.equal(compare.code, 0, `the survivor and the new leg differ: ${describeResult(compare)}`);
    // The survivor's unit dies too: the data is all on the new leg.
    const survivorUnit = san.units.get(survivor.unit) as UnitProcess;
    survivorUnit.child.signal("SIGKILL");
    await survivorUnit.child.exited;
    assert.equal(await exportSha256(newLeg.uri, SIZE, san.tmp.file("new-leg.img")), viaEngine, "the new leg alone holds the volume's data");
  } finally {
    if (agent !== undefined) await agent.stop("SIGTERM");
    await san.close();
  }
});
