// A mirrored volume end to end with real processes (issue 6 section 1): a
// station and three units that join it; `ipsan host request --copies 2` gets
// two legs on two different units, each a volume 1 MiB larger than asked
// (the engine's metadata) and granted to this host, as the units themselves
// say (grants by the host's identity: the units speak NBD over TLS, the
// legs' URIs are nbds:// with the host's key files under its state dir). `ipsan host attach --mode nbd --json` starts the mirror engine
// detached and prints {assignment, mode, uri, pid}: nbdinfo on that URI shows
// the requested size; a pattern written with nbdsh reads back, and is on
// both legs (read straight from each unit). The agent restarts the engine
// after kill -9, with the same bytes. Then one leg's unit is killed with -9:
// the engine keeps working (a second pattern writes and reads back, and is on
// the surviving leg). `detach` stops the engine (it exits); `--mode fuse` on
// the mirror puts nbdfuse on the engine and reads the same bytes; `release`,
// once the killed unit is back, revokes both legs' grants on the units and
// leaves both legs free volumes at the station.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { IpsanChild } from "../demo/child.ts";
import { isEngineProcess, processAlive } from "../host/attach.ts";
import { decodeRecord, recordKey } from "../host/state.ts";
import { childEnv, runOk, waitFor } from "../testing/process.ts";
import { nbdsh } from "../testing/clients.ts";
import { San, type UnitProcess } from "./harness.ts";

const MIB = 1024 * 1024;
const SIZE = 32 * MIB;

interface Leg {
  unit: string;
  volume: string;
  sizeBytes: number;
  uri: string;
  state: string;
}
interface Mirror {
  id: string;
  host: string;
  unit: string;
  volume: string;
  sizeBytes: number;
  uri: string | null;
  copies: number;
  legs: Leg[];
  state: string;
}
interface UnitVolume {
  name: string;
  sizeBytes: number;
  /** Address grants (none on a unit that speaks TLS). */
  grants: string[];
  /** Identity grants: which host may open which export. */
  access: { host: string; export: string; from: string[] }[];
}

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

async function nbdWrite(uri: string, file: string, offset: number): Promise<void> {
  await nbdsh(uri, `h.pwrite(open(${JSON.stringify(file)}, "rb").read(), ${offset}); h.flush()`, 30_000);
}

/** sha256 of a range, read with nbdsh (an engine's nbd+unix:// URI or a leg's nbds:// one with its key file). */
async function nbdSha(uri: string, offset: number, length: number): Promise<string> {
  const result = await nbdsh(uri, `import hashlib; print(hashlib.sha256(h.pread(${length}, ${offset})).hexdigest())`, 30_000);
  return result.stdout.trim();
}

/** A volume as the unit itself reports it (its control API, its own token). */
async function unitVolume(unit: UnitProcess, name: string): Promise<UnitVolume> {
  const control = (await unit.child.waitForLine(/^ipsan unit \S+ control (http:\/\/\S+)/, 10_000))[1] ?? "";
  const token = readFileSync(join(unit.dataDir, "control.token"), "utf8").trim();
  const response = await fetch(`${control}/v1/volumes/${encodeURIComponent(name)}`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(response.status, 200, `GET ${control}/v1/volumes/${name}`);
  return (await response.json()) as UnitVolume;
}

test("mirror: request --copies 2, attach --mode nbd (engine), agent restarts it, a leg's unit dies, detach, fuse, release", { timeout: 240_000 }, async () => {
  const san = new San("mirror");
  let agent: IpsanChild | undefined;
  try {
    const station = await san.startStation();
    for (const name of ["u1", "u2", "u3"]) await san.startUnit(name);
    await san.waitUnits(["u1", "u2", "u3"]);
    const stateDir = san.tmp.file("host-state");
    const common = ["--station", station.apiUrl, "--token-file", station.tokenFile, "--host", "h1"];

    // request: two legs on two units, each 1 MiB larger than asked, granted to this host (by its
    // identity: the units speak NBD over TLS, the legs' URIs are nbds:// with the host's key files).
    const mirror = (await san.host(["request", ...common, "--size", "32M", "--copies", "2", "--state-dir", stateDir, "--json"])).json as Mirror;
    assert.equal(mirror.copies, 2);
    assert.equal(mirror.sizeBytes, SIZE);
    assert.equal(mirror.uri, null, "a mirror has no direct URI");
    assert.equal(mirror.legs.length, 2);
    assert.notEqual(mirror.legs[0]?.unit, mirror.legs[1]?.unit, "two different units");
    for (const leg of mirror.legs) {
      const onUnit = await unitVolume(san.units.get(leg.unit) as UnitProcess, leg.volume);
      assert.equal(onUnit.sizeBytes, SIZE + MIB, `${leg.unit}/${leg.volume}: the size + 1 MiB of metadata`);
      assert.deepEqual(onUnit.grants, [], `${leg.unit}/${leg.volume}: no address grants`);
      assert.deepEqual(onUnit.access.map((a) => [a.host, a.export]), [["h1", leg.volume]], `${leg.unit}/${leg.volume}: granted to the host`);
      assert.match(leg.uri, new RegExp(`^nbds://h1@.*\\?tls-psk-file=${stateDir.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}/keys/${leg.unit}\\.psk$`), "the leg's URI with the host's key file");
      assert.equal(leg.state, "in-sync");
    }
    const readable = await san.host(["request", ...common, "--size", "32M", "--copies", "2", "--request-id", String((mirror as unknown as { requestId: string }).requestId), "--state-dir", stateDir]);
    assert.match(readable.result.stdout, /mirrored volume of 32M .*2 copies/, "the readable form says it is a mirror");
    assert.match(readable.result.stdout, /--mode nbd/);

    // attach --mode nbd: the engine, detached, on a socket under the state dir.
    const attached = (await san.host(["attach", ...common, "--assignment", mirror.id, "--mode", "nbd", "--state-dir", stateDir, "--json"])).json as {
      assignment: string;
      mode: string;
      uri: string;
      pid: number;
    };
    assert.equal(attached.assignment, mirror.id);
    assert.equal(attached.mode, "nbd");
    assert.match(attached.uri, new RegExp(`^nbd\\+unix:///${mirror.id}\\?socket=${stateDir.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}/run/`));
    assert.ok(await isEngineProcess(attached.pid, mirror.id), "pid is the running engine");
    const again = (await san.host(["attach", ...common, "--assignment", mirror.id, "--mode", "nbd", "--state-dir", stateDir, "--json"])).json as { uri: string; pid: number };
    assert.deepEqual([again.uri, again.pid], [attached.uri, attached.pid], "attaching again answers the same engine");
    const size = await runOk("nbdinfo", ["--size", attached.uri], { timeoutMs: 30_000 });
    assert.equal(Number(size.stdout.trim()), SIZE, "nbdinfo on the engine's URI shows the requested size");

    const first = randomBytes(MIB);
    writeFileSync(san.tmp.file("first"), first);
    await nbdWrite(attached.uri, san.tmp.file("first"), MIB);
    assert.equal(await nbdSha(attached.uri, MIB, MIB), sha256(first), "read back through the engine");
    for (const leg of mirror.legs) assert.equal(await nbdSha(leg.uri, MIB, MIB), sha256(first), `the pattern is on leg ${leg.unit}/${leg.volume}`);

    // The agent restarts an engine that died, from the record alone; same bytes.
    const recordPath = join(stateDir, "attachments", `${recordKey(mirror.id)}.json`);
    const readRecord = () => {
      const decoded = decodeRecord(readFileSync(recordPath, "utf8"));
      if (decoded.kind !== "record") throw new Error(`unreadable record: ${decoded.reason}`);
      return decoded.record;
    };
    assert.equal(readRecord().engine?.pid, attached.pid);
    process.kill(attached.pid, "SIGKILL");
    agent = new IpsanChild(["host", "agent", ...common, "--heartbeat-ms", "200", "--state-dir", stateDir], { name: "agent", logFile: san.log("agent"), env: childEnv() });
    await agent.waitForLine(/^ipsan host agent h1 running/, 10_000);
    const restarted = await waitFor(
      "the agent restarts the engine",
      async () => {
        const r = readRecord();
        return r.pid !== attached.pid && r.pid !== null && (await isEngineProcess(r.pid, mirror.id)) ? r : undefined;
      },
      { timeoutMs: 30_000, intervalMs: 100 },
    );
    assert.equal(restarted.uri, attached.uri, "the same socket");
    assert.equal(restarted.engine?.pid, restarted.pid);
    assert.equal(await nbdSha(restarted.uri, MIB, MIB), sha256(first), "same bytes after the engine's restart");
    assert.equal((await agent.stop("SIGTERM")).code, 0);
    agent = undefined;

    // kill -9 one leg's unit: the engine keeps working on the other leg.
    const dead = mirror.legs[1] as Leg;
    const survivor = mirror.legs[0] as Leg;
    const deadUnit = san.units.get(dead.unit) as UnitProcess;
    deadUnit.child.signal("SIGKILL");
    await deadUnit.child.exited;
    const second = randomBytes(MIB);
    writeFileSync(san.tmp.file("second"), second);
    await nbdWrite(restarted.uri, san.tmp.file("second"), 4 * MIB);
    assert.equal(await nbdSha(restarted.uri, 4 * MIB, MIB), sha256(second), "a write after the unit's death reads back");
    assert.equal(await nbdSha(restarted.uri, MIB, MIB), sha256(first), "and the earlier one too");
    assert.equal(await nbdSha(survivor.uri, 4 * MIB, MIB), sha256(second), "the surviving leg has it");
    const listed = (await san.host(["list", "--state-dir", stateDir, "--json"])).json as { items: { assignment: string; mode: string; alive: boolean }[] };
    assert.deepEqual(listed.items.map((i) => [i.assignment, i.mode, i.alive]), [[mirror.id, "nbd", true]]);

    // detach stops the engine (SIGTERM: it flushes, then exits).
    const detached = await san.host(["detach", "--assignment", mirror.id, "--state-dir", stateDir]);
    assert.match(detached.result.stdout, /^detached /);
    assert.equal(processAlive(restarted.pid ?? 0), false, "the engine exited");

    // fuse on the mirror: nbdfuse on the engine's socket, the same bytes.
    const fused = (await san.host(["attach", ...common, "--assignment", mirror.id, "--mode", "fuse", "--state-dir", stateDir, "--json"])).json as {
      path: string;
      pid: number;
      engine: { pid: number; uri: string };
    };
    assert.ok(fused.path.startsWith(stateDir), fused.path);
    assert.ok(await isEngineProcess(fused.engine.pid, mirror.id));
    await runOk("dd", [`if=${fused.path}`, `of=${san.tmp.file("back")}`, "bs=64K", "skip=64", "count=16", "status=none"]);
    assert.equal(sha256(readFileSync(san.tmp.file("back"))), sha256(second), "the nbdfuse file over the engine holds the mirror's bytes");
    await san.host(["detach", "--assignment", mirror.id, "--state-dir", stateDir]);
    assert.equal(processAlive(fused.engine.pid), false, "detach stopped nbdfuse's engine too");
    assert.equal(processAlive(fused.pid), false);

    // Release once the dead unit is back: both legs' grants revoked on the units, both legs free volumes.
    await san.startUnit(dead.unit);
    await san.waitUnits([dead.unit]);
    const released = (await san.host(["release", ...common, "--assignment", mirror.id, "--state-dir", stateDir, "--json"])).json as { released: string };
    assert.equal(released.released, mirror.id);
    const client = await san.client();
    for (const leg of mirror.legs) {
      const onUnit = await waitFor(
        `grant of ${leg.unit}/${leg.volume} revoked`,
        async () => {
          const v = await unitVolume(san.units.get(leg.unit) as UnitProcess, leg.volume);
          return v.grants.length === 0 && v.access.length === 0 ? v : undefined;
        },
        { timeoutMs: 15_000 },
      );
      assert.equal(onUnit.sizeBytes, SIZE + MIB);
      const volume = (await client.call("GET", `/api/v1/volumes/${leg.unit}/${leg.volume}`)) as { assignedTo: string | null };
      assert.equal(volume.assignedTo, null, `${leg.unit}/${leg.volume} is a free volume`);
    }
    const final = (await client.call("GET", `/api/v1/assignments/${mirror.id}`)) as Mirror;
    assert.equal(final.state, "released");
  } finally {
    await agent?.stop("SIGKILL");
    await san.close();
  }
});
