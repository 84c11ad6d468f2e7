// Partitions of a volume as their own exports, seen by real clients: after
// the control API splits volume "pv" (64 MiB) into 16 MiB + 32 MiB, nbdinfo
// lists "pv/p1" and "pv/p2" with exactly those sizes; qemu-io fills p1 with one
// pattern and p2 with another, and each read back verifies; a write that runs
// past p1's end is refused by the unit (libnbd's client-side bounds check
// switched off so the request really reaches it) and changes nothing; and
// the whole volume, read through its own export, holds p1's bytes, then p2's,
// then zeros — so no write through one partition touched the other.
// ipsan only: nbdkit has no partitions-as-exports (skipped when
// IPSAN_REALCLIENTS_SERVER=nbdkit).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { nbdinfoList, nbdinfoSize, nbdsh, qemuIoOk } from "../testing/clients.ts";
import { controlOk } from "../testing/control.ts";
import { runOk } from "../testing/process.ts";
import { startTarget, targetKind, type Target } from "../testing/target.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

const MIB = 1024 * 1024;
const SECTOR_BYTES = 512;
const VOLUME_BYTES = 64 * MIB;
const P1_BYTES = 16 * MIB;
const P2_BYTES = 32 * MIB;

interface PartitionInfo {
  index: number;
  name: string;
  startLba: number;
  lengthLba: number;
  sizeBytes: number;
}

const nbdkit = targetKind() === "nbdkit";
let target: Target;
let tmp: TempDir;
let partitions: PartitionInfo[] = [];
before(async () => {
  if (nbdkit) return;
  tmp = makeTempDir("partitions");
  target = await startTarget({ volumes: [{ name: "pv", sizeBytes: VOLUME_BYTES }, { name: "other", sizeBytes: 8 * MIB }], control: true });
  const unit = target.unit;
  assert.ok(unit !== undefined);
  const volume = (await controlOk(unit, "PUT", "/v1/volumes/pv/partitions", { sizesBytes: [P1_BYTES, P2_BYTES] })) as {
    partitions: PartitionInfo[];
  };
  partitions = volume.partitions;
});
after(async () => {
  await target?.close();
  tmp?.remove();
});

test("partition exports are listed with their exact sizes", { skip: nbdkit }, async () => {
  assert.deepEqual(
    partitions.map((p) => ({ index: p.index, name: p.name, sizeBytes: p.sizeBytes, lengthLba: p.lengthLba })),
    [
      { index: 1, name: "pv/p1", sizeBytes: P1_BYTES, lengthLba: P1_BYTES / SECTOR_BYTES },
      { index: 2, name: "pv/p2", sizeBytes: P2_BYTES, lengthLba: P2_BYTES / SECTOR_BYTES },
    ],
  );
  const report = await nbdinfoList(target.listUri());
  const sizes = Object.fromEntries(report.exports.map((entry) => [entry["export-name"], entry["export-size"]]));
  assert.deepEqual(sizes, { pv: VOLUME_BYTES, "pv/p1": P1_BYTES, "pv/p2": P2_BYTES, other: 8 * MIB });
  assert.equal(await nbdinfoSize(target.uri("pv/p1")), P1_BYTES);
  assert.equal(await nbdinfoSize(target.uri("pv/p2")), P2_BYTES);
});

test("writing one partition does not change the other", { skip: nbdkit }, async () => {
  const p1 = target.uri("pv/p1");
  const p2 = target.uri("pv/p2");
  await qemuIoOk(p1, [`write -P 0x5a 0 ${P1_BYTES}`, "flush"]);
  await qemuIoOk(p2, [`read -P 0x00 0 ${P2_BYTES}`]);
  await qemuIoOk(p2, [`write -P 0xa5 0 ${P2_BYTES}`, "flush"]);
  await qemuIoOk(p1, [`read -P 0x5a 0 ${P1_BYTES}`]);

  // A write straddling p1's end must fail at the unit with ENOSPC (the NBD spec's
  // code for a write past the end) and the connection stays usable.
  const probe = await nbdsh(
    p1,
    [
      "import nbd",
      "h.set_strict_mode(0)",
      "try:",
      `    h.pwrite(b"\\xee" * 4096, ${P1_BYTES - 512})`,
      "    print('accepted')",
      "except nbd.Error as e:",
      "    print('refused', e.errno)",
      `print('tail', h.pread(512, ${P1_BYTES - 512})[0])`,
    ].join("\n"),
  );
  assert.match(probe.stdout, /^refused ENOSPC$/m, probe.stdout);
  assert.match(probe.stdout, /^tail 90$/m, "p1's last sector still 0x5a");

  // The whole volume through its own export: p1 bytes, p2 bytes, zeros elsewhere.
  const path = tmp.file("pv.raw");
  await runOk("nbdcopy", [target.uri("pv"), path]);
  const volume = readFileSync(path);
  const expected = Buffer.alloc(VOLUME_BYTES);
  const [first, second] = partitions;
  assert.ok(first !== undefined && second !== undefined);
  expected.fill(0x5a, first.startLba * SECTOR_BYTES, first.startLba * SECTOR_BYTES + P1_BYTES);
  expected.fill(0xa5, second.startLba * SECTOR_BYTES, second.startLba * SECTOR_BYTES + P2_BYTES);
  assert.ok(volume.equals(expected), "volume bytes are exactly the two partitions' patterns and zeros");
  // And the neighbouring volume saw nothing.
  await qemuIoOk(target.uri("other"), [`read -P 0x00 0 ${8 * MIB}`]);
});
