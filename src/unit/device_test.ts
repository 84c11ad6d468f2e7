// Proves `ipsan unit --device PATH` on a real block device (a loop device
// over a sparse file, made and removed by the test) and on a plain file:
// the size comes from the device (BLKGETSIZE64 / lseek), volumes work end to
// end with nbdsh (FUA write, write-zeroes through BLKZEROOUT, trim through
// BLKDISCARD, flush), FAST_ZERO is not advertised on a device, the volume
// survives a restart, a --capacity larger than the device is refused naming
// both sizes, and a device holding foreign data is not formatted over.

import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readFileSync, writeSync } from "node:fs";
import { nbdinfoJson, nbdsh } from "../testing/clients.ts";
import { run, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, startUnit } from "../testing/unit.ts";

const MIB = 1024 * 1024;

test("--device on a loop device", async () => {
  const dir = makeTempDir("device");
  await runOk("truncate", ["-s", "64M", dir.file("backing.img")]);
  const loop = (await runOk("losetup", ["-f", "--show", dir.file("backing.img")])).stdout.trim();
  try {
    const args = { dataDir: dir.path, capacity: "64M", extraArgs: ["--device", loop], volumes: [{ name: "v", size: "16M" }] };
    const unit = await startUnit(args);
    try {
      const info = await nbdinfoJson(unit.uri("v"));
      const exported = info.exports[0];
      assert.equal(exported?.["export-size"], 16 * MIB);
      assert.equal(exported?.["can_fast_zero"], false);
      const result = await nbdsh(
        unit.uri("v"),
        [
          'h.pwrite(b"\\x55" * 65536, 0, nbd.CMD_FLAG_FUA)',
          "h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)",
          "h.zero(4096, 4096)",
          "h.trim(8192, 16384)  # content after a trim is unspecified; only check around it",
          "h.flush()",
          "data = h.pread(65536, 0)",
          "print(data[0:8192].count(0), data[8192:16384].count(0x55), data[24576:].count(0x55))",
        ].join("\n"),
      );
      assert.equal(result.stdout.trim(), "8192 8192 40960");
      assert.match(unit.stderr(), new RegExp(`storage formatted path=${loop}`));
    } finally {
      await unit.close();
    }
    const again = await startUnit(args);
    try {
      const result = await nbdsh(again.uri("v"), "print(h.pread(4096, 61440).count(0x55))");
      assert.equal(result.stdout.trim(), "4096", "data on the device survived a restart");
    } finally {
      await again.close();
    }
    const tooBig = await run(process.execPath, [IPSAN_BIN, "unit", "--data", dir.path, "--device", loop, "--capacity", "1G", "--listen", "127.0.0.1:0"]);
    assert.equal(tooBig.code, 2);
    assert.match(tooBig.stderr, /--capacity 1073741824 is larger than --device .* \(67108864 bytes\)/);
  } finally {
    await run("losetup", ["-d", loop]);
    dir.remove();
  }
});

test("--device on a plain file; foreign data is not formatted over", async () => {
  const dir = makeTempDir("device-file");
  try {
    await runOk("truncate", ["-s", "32M", dir.file("disk.img")]);
    const unit = await startUnit({ dataDir: dir.path, capacity: "32M", extraArgs: ["--device", dir.file("disk.img")], volumes: [{ name: "f", size: "8M" }] });
    await unit.close();
    await runOk("truncate", ["-s", "32M", dir.file("foreign.img")]);
    const fd = openSync(dir.file("foreign.img"), "r+");
    writeSync(fd, Buffer.from("\x7fELF not an ipsan disk"), 0, 22, 0);
    closeSync(fd);
    const refused = await run(process.execPath, [IPSAN_BIN, "unit", "--data", dir.path, "--device", dir.file("foreign.img"), "--listen", "127.0.0.1:0"]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /foreign\.img: no valid volume table .*not all zero.*ipsan unit format --data .* --device .*foreign\.img --force/);
    // Nothing was written: the foreign bytes are still there.
    assert.equal(readFileSync(dir.file("foreign.img")).subarray(0, 22).toString("latin1"), "\x7fELF not an ipsan disk");
  } finally {
    dir.remove();
  }
});
