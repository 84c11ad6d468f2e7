// Out-of-band (seed Fig. 1 versus the in-band Fig. 8): the station is not on
// the data path. A station and two units (joined over the discovery protocol)
// give host h1 a 64 MiB volume; fio (ioengine=nbd, 4 KiB random writes at
// QD 16, crc32c in every block, paced to last ~4 s) runs on the assigned URI
// straight against the unit, over NBD with TLS-PSK (the default: the URI is
// nbds://h1@... with the key file `ipsan host request` wrote to its state
// dir, which fio reads through fioTlsEnv's preload); one second in, the
// station is killed with kill -9. fio must still be running at that moment,
// and must finish with zero errors and its verify pass clean. The station is
// then restarted on the same data dir and ports: the pool must be whole again
// (the same units online, the same volumes with the same extents, the same
// assignments), and a second, read-only fio verify pass proves every block
// written survived.

import { test } from "node:test";
import assert from "node:assert/strict";
import type { Assignment, StationClient } from "../host/station_client.ts";
import { fioTlsEnv } from "../testing/fio_tls.ts";
import { sleep } from "../testing/process.ts";
import { San, describeFio, fio, verifyJob, verifyOnlyJob } from "./harness.ts";

const MIB = 1024 * 1024;
const VOLUME_BYTES = 64 * MIB;
const WRITE_PHASE_S = 4;
const KILL_AFTER_MS = 1_000;

async function poolSnapshot(client: StationClient): Promise<unknown> {
  const units = (await client.units())
    .map((u) => ({ name: u.name, state: u.state, capacityBytes: u.capacityBytes, freeBytes: u.freeBytes, nbd: u.nbd, volumeCount: u.volumeCount }))
    .sort((a, b) => a.name.localeCompare(b.name));
  const volumes = (await client.volumes())
    .map((v) => {
      const { id, unit, name, sizeBytes, assignedTo } = v;
      return { id, unit, name, sizeBytes, assignedTo, extents: (v as { extents?: unknown }).extents };
    })
    .sort((a, b) => a.id.localeCompare(b.id));
  const assignments = (await client.assignments())
    .map((a) => ({ id: a.id, host: a.host, hostAddress: a.hostAddress, unit: a.unit, volume: a.volume, uri: a.uri, state: a.state, startLba: a.startLba, endLba: a.endLba }))
    .sort((a, b) => a.id.localeCompare(b.id));
  return { units, volumes, assignments };
}

test("out-of-band: fio on an assigned volume survives kill -9 of the station; the pool is whole after restart", { timeout: 150_000 }, async () => {
  const san = new San("oob");
  try {
    const station = await san.startStation();
    await san.startUnit("u1");
    await san.startUnit("u2");
    await san.waitUnits(["u1", "u2"]);
    const { json } = await san.host([
      "request", "--station", station.apiUrl, "--token-file", station.tokenFile,
      "--host", "h1", "--size", "64M", "--state-dir", san.tmp.file("state-h1"), "--json",
    ]);
    const assignment = json as Assignment;
    assert.equal(assignment.sizeBytes, VOLUME_BYTES);
    assert.match(assignment.uri, /^nbds:\/\/h1@127\.0\.0\.1:[0-9]+\/[^?\s]+\?tls-psk-file=\S+$/);
    const fioEnv = await fioTlsEnv(san.tmp.path);
    const before = await poolSnapshot(await san.client());

    let fioDone = false;
    const fioRun = fio("oob", assignment.uri, verifyJob(VOLUME_BYTES, WRITE_PHASE_S), undefined, fioEnv).finally(() => {
      fioDone = true;
    });
    await sleep(KILL_AFTER_MS);
    assert.equal(fioDone, false, "fio must still be running when the station dies");
    station.child.signal("SIGKILL");
    const killed = await station.child.exited;
    assert.equal(killed.signal, "SIGKILL");
    assert.equal(fioDone, false, "fio still running after the station died");

    const run = await fioRun;
    assert.equal(run.result.code, 0, describeFio(run));
    assert.equal(run.totalErrors, 0, describeFio(run));
    assert.equal(run.jobs[0]?.write.io_bytes, VOLUME_BYTES, describeFio(run));
    assert.equal(run.jobs[0]?.read.io_bytes, VOLUME_BYTES, `verify pass read every block: ${describeFio(run)}`);

    // Same data dir, same ports: the units keep sending to the discovery address they were given.
    await san.startStation({ dataDir: station.dataDir, http: new URL(station.apiUrl).host, discovery: station.discovery });
    await san.waitUnits(["u1", "u2"]);
    const after = await poolSnapshot(await san.client());
    assert.deepEqual(after, before, "units, volumes and assignments after the restart match those before");

    const verify = await fio("oob-verify", assignment.uri, verifyOnlyJob(VOLUME_BYTES), undefined, fioEnv);
    assert.equal(verify.result.code, 0, describeFio(verify));
    assert.equal(verify.totalErrors, 0, describeFio(verify));
    assert.equal(verify.jobs[0]?.read.io_bytes, VOLUME_BYTES, describeFio(verify));
  } finally {
    await san.close();
  }
});
