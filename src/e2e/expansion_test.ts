// Dynamic capacity expanding (seed "Dynamic Capacity Expanding"): units join
// the pool while a host is busy, and the host notices nothing. Two units join
// a station; host h1 gets a 64 MiB volume and fio (randwrite, QD 16, crc32c,
// paced to ~6 s, then a verify pass) runs on it over NBD with TLS-PSK (the
// default: the nbds:// URI and key file `ipsan host request` gives, fio with
// fioTlsEnv's preload); while fio is writing, two more units start and join
// over the discovery protocol. They must be online in GET /api/v1/units while
// fio is still running, the pool's capacity (the sum over the units) must
// grow by exactly their capacity, fio must finish with zero errors, and a new
// allocation too big for the first two units must land on one of the new
// ones.

import { test } from "node:test";
import assert from "node:assert/strict";
import type { Assignment } from "../host/station_client.ts";
import { fioTlsEnv } from "../testing/fio_tls.ts";
import { sleep } from "../testing/process.ts";
import { San, describeFio, fio, sumCapacity, verifyJob } from "./harness.ts";

const MIB = 1024 * 1024;
const VOLUME_BYTES = 64 * MIB;
const FIRST_CAPACITY = "128M";
const NEW_CAPACITY = "512M";
// Long enough that two node processes can start and join even on a loaded 2-core machine.
const WRITE_PHASE_S = 6;

test("expansion: two units join while fio runs; capacity grows; fio sees no error", { timeout: 150_000 }, async () => {
  const san = new San("expansion");
  try {
    const station = await san.startStation();
    await san.startUnit("u1", { capacity: FIRST_CAPACITY });
    await san.startUnit("u2", { capacity: FIRST_CAPACITY });
    const first = await san.waitUnits(["u1", "u2"]);
    const capacityBefore = sumCapacity(first);
    assert.ok(capacityBefore > 0 && capacityBefore <= 2 * 128 * MIB, `capacity before ${capacityBefore}`);
    const { json } = await san.host([
      "request", "--station", station.apiUrl, "--token-file", station.tokenFile, "--host", "h1", "--size", "64M",
      "--state-dir", san.tmp.file("state-h1"), "--json",
    ]);
    const assignment = json as Assignment;
    assert.match(assignment.uri, /^nbds:\/\/h1@.*\?tls-psk-file=/);
    const fioEnv = await fioTlsEnv(san.tmp.path);

    let fioDone = false;
    const fioRun = fio("expansion", assignment.uri, verifyJob(VOLUME_BYTES, WRITE_PHASE_S), undefined, fioEnv).finally(() => {
      fioDone = true;
    });
    await sleep(300);
    await Promise.all([san.startUnit("u3", { capacity: NEW_CAPACITY }), san.startUnit("u4", { capacity: NEW_CAPACITY })]);
    const all = await san.waitUnits(["u1", "u2", "u3", "u4"]);
    assert.equal(fioDone, false, "the new units were online while fio was still running");
    const added = sumCapacity(all.filter((u) => u.name === "u3" || u.name === "u4"));
    assert.ok(added > 2 * 500 * MIB, `new units report their capacity: ${added}`);
    assert.equal(sumCapacity(all), capacityBefore + added, "pool capacity grew by the new units' capacity");

    const run = await fioRun;
    assert.equal(run.result.code, 0, describeFio(run));
    assert.equal(run.totalErrors, 0, describeFio(run));
    assert.equal(run.jobs[0]?.write.io_bytes, VOLUME_BYTES, describeFio(run));

    // 256 MiB fits on no first unit (128 MiB each): it must be carved on a new one.
    const big = await san.host([
      "request", "--station", station.apiUrl, "--token-file", station.tokenFile, "--host", "h2", "--size", "256M",
      "--state-dir", san.tmp.file("state-h2"), "--json",
    ]);
    const bigAssignment = big.json as Assignment;
    assert.ok(["u3", "u4"].includes(bigAssignment.unit), `256M landed on ${bigAssignment.unit}`);
  } finally {
    await san.close();
  }
});
