// Crash of the unit PROCESS (issue 2 section 5), over the wire with a real
// client: data that nbdsh wrote with FUA, or wrote and then FLUSHed, is read
// back identical after the unit is killed with SIGKILL and restarted on the
// same storage; and a unit killed with SIGKILL while volume creates are in
// flight on its control API restarts with a valid table that holds every
// volume whose create was acknowledged (5 rounds, random kill moments).
//
// What this does NOT prove: that anything was synced. kill -9 ends the
// process, not the machine: the kernel's page cache keeps every write the
// unit made, so these tests would pass if FUA, FLUSH and the table's
// fdatasync did nothing. They prove that acknowledged data and tables reach
// the storage file in a form a restarted unit reads back. The proof that the
// unit fdatasyncs the storage after a request's data and before its reply
// (FUA WRITE, WRITE_ZEROES, TRIM, FLUSH) is durability_sync_test, which
// traces the unit's system calls with strace and has canaries that must fail.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { writeFileSync } from "node:fs";
import { nbdRead, nbdsh } from "../testing/clients.ts";
import { controlOk, controlRequest } from "../testing/control.ts";
import { sleep } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";

const MIB = 1024 * 1024;

test("FUA writes and flushed writes survive kill -9 and a restart", async () => {
  const dir = makeTempDir("durability");
  try {
    const unit = await startUnit({ dataDir: dir.path, capacity: "64M", volumes: [{ name: "d", size: "16M" }] });
    const fua = randomBytes(256 * 1024);
    const flushed = randomBytes(512 * 1024);
    const unaligned = randomBytes(1536);
    writeFileSync(dir.file("fua.bin"), fua);
    writeFileSync(dir.file("flushed.bin"), flushed);
    writeFileSync(dir.file("unaligned.bin"), unaligned);
    try {
      await nbdsh(
        unit.uri("d"),
        [
          `h.pwrite(open("${dir.file("fua.bin")}", "rb").read(), 0, nbd.CMD_FLAG_FUA)`,
          `h.pwrite(open("${dir.file("flushed.bin")}", "rb").read(), ${MIB})`,
          `h.pwrite(open("${dir.file("unaligned.bin")}", "rb").read(), ${15 * MIB + 512})`,
          "h.flush()",
        ].join("\n"),
      );
    } finally {
      await unit.kill9();
    }
    const again = await startUnit({ dataDir: dir.path, capacity: "64M", volumes: [{ name: "d", size: "16M" }] });
    try {
      assert.ok((await nbdRead(again.uri("d"), 0, fua.length)).equals(fua), "FUA write survived");
      assert.ok((await nbdRead(again.uri("d"), MIB, flushed.length)).equals(flushed), "flushed write survived");
      assert.ok((await nbdRead(again.uri("d"), 15 * MIB + 512, unaligned.length)).equals(unaligned), "sector-aligned (not 4K-aligned) flushed write survived");
    } finally {
      await again.close();
    }
  } finally {
    dir.remove();
  }
});

interface VolumeItem {
  name: string;
  extents: { startLba: number; endLba: number }[];
}

test("kill -9 during volume creates: the table is valid and keeps every acknowledged volume", async () => {
  const dir = makeTempDir("durability-create");
  try {
    for (let round = 0; round < 5; round++) {
      const unit = await startUnit({ dataDir: dir.path, capacity: "256M", control: true });
      const acknowledged: string[] = [];
      const creates = Array.from({ length: 12 }, (_, i) =>
        controlRequest(unit, "POST", "/v1/volumes", { name: `r${round}-${i}`, sizeBytes: (1 + (i % 3)) * MIB })
          .then((r) => {
            if (r.status === 201) acknowledged.push(`r${round}-${i}`);
          })
          .catch(() => undefined),
      );
      const delayMs = randomInt(0, 40);
      try {
        await sleep(delayMs);
      } finally {
        await unit.kill9();
      }
      await Promise.all(creates);
      const again = await startUnit({ dataDir: dir.path, capacity: "256M", control: true });
      try {
        const listed = (await controlOk(again, "GET", "/v1/volumes")) as { items: VolumeItem[] };
        const names = new Set(listed.items.map((v) => v.name));
        for (const name of acknowledged) assert.ok(names.has(name), `round ${round} (kill after ${delayMs} ms): acknowledged volume ${name} survived`);
        const ranges = listed.items.flatMap((v) => v.extents).sort((a, b) => a.startLba - b.startLba);
        for (let i = 1; i < ranges.length; i++) assert.ok((ranges[i]?.startLba ?? 0) > (ranges[i - 1]?.endLba ?? 0), "no overlap after restart");
        // Clean up for the next round through the API, which also proves the table is writable.
        for (const v of listed.items) await controlOk(again, "DELETE", `/v1/volumes/${v.name}`);
      } finally {
        await again.close();
      }
    }
  } finally {
    dir.remove();
  }
});
