// qemu-img and qemu-io (QEMU's own NBD block driver) against a real `ipsan
// unit`: qemu-img info sees the exact size; a raw image with data and zero
// runs converted INTO a volume pre-filled with 0xff is byte-identical to it
// (qemu-img compare, and a sha256 of a copy converted back OUT); one changed
// byte makes compare report a difference (so compare can fail). qemu-io writes
// patterns at unaligned offsets and reads them back with -P verification, and
// a second client (nbdcopy) reads the whole volume to check every byte against
// a model, including the untouched ones; asynchronous writes with aio_flush
// are read back the same way.
// Run with IPSAN_REALCLIENTS_SERVER=nbdkit to check these tests against nbdkit.

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { qemuIo, qemuIoOk } from "../testing/clients.ts";
import { newSeed, SeededBytes, sha256, sha256File } from "../testing/data.ts";
import { describeResult, run, runOk } from "../testing/process.ts";
import { startTarget, type Target } from "../testing/target.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
const CONV_BYTES = 32 * MIB;
const IO_BYTES = 16 * MIB;
const AIO_BYTES = 8 * MIB;

let target: Target;
let tmp: TempDir;
before(async () => {
  tmp = makeTempDir("qemu");
  target = await startTarget({
    volumes: [
      { name: "conv", sizeBytes: CONV_BYTES },
      { name: "io", sizeBytes: IO_BYTES },
      { name: "aio", sizeBytes: AIO_BYTES },
    ],
  });
});
after(async () => {
  await target?.close();
  tmp?.remove();
});

/** The whole export, read by nbdcopy (a different client from the one that wrote). */
async function readExport(uri: string): Promise<Buffer> {
  const path = tmp.file(`readback-${Date.now()}.raw`);
  await runOk("nbdcopy", [uri, path], { timeoutMs: 60_000 });
  return readFileSync(path);
}

function firstDifference(actual: Buffer, expected: Buffer): string {
  if (actual.length !== expected.length) return `length ${actual.length} != ${expected.length}`;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) return `first difference at offset ${i}: 0x${actual[i]?.toString(16)} != 0x${expected[i]?.toString(16)}`;
  }
  return "identical";
}

test("qemu-img info reports the volume's exact size", async () => {
  const result = await runOk("qemu-img", ["info", "--output=json", "-f", "raw", target.uri("conv")]);
  const info = JSON.parse(result.stdout) as { "virtual-size": number; format: string };
  assert.equal(info["virtual-size"], CONV_BYTES);
  assert.equal(info.format, "raw");
});

test("qemu-img convert into and out of a volume is byte-identical, and compare sees one changed byte", async () => {
  const uri = target.uri("conv");
  const seed = newSeed();
  process.stdout.write(`# seed ${seed}\n`);
  // Data with runs of zeros: qemu-img sends those as zero requests, so the
  // volume must really read as zero there even though we filled it with 0xff.
  const image = new SeededBytes(seed).next(CONV_BYTES);
  image.fill(0, 4 * MIB, 8 * MIB);
  image.fill(0, 20 * MIB, 20 * MIB + 64 * KIB);
  image.fill(0, CONV_BYTES - 1 * MIB);
  const imagePath = tmp.file("image.raw");
  writeFileSync(imagePath, image);
  await qemuIoOk(uri, [`write -P 0xff 0 ${CONV_BYTES}`, "flush"]);

  await runOk("qemu-img", ["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", imagePath, uri]);
  const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", imagePath, uri]);
  assert.equal(same.code, 0, describeResult(same));

  const outPath = tmp.file("out.raw");
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, outPath]);
  assert.equal(await sha256File(outPath), sha256(image), "converted out of the volume");

  await qemuIoOk(uri, [`write -P 0x00 ${12 * MIB + 12345} 1`]);
  const differs = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", imagePath, uri]);
  assert.equal(differs.code, 1, describeResult(differs));
  assert.match(differs.stdout, /Content mismatch at offset/);
});

test("qemu-io pattern writes and reads at unaligned offsets", async () => {
  const uri = target.uri("io");
  const model = Buffer.alloc(IO_BYTES);
  const writes = [
    { pattern: 0x41, offset: 1000, length: 5000 },
    { pattern: 0x42, offset: 6000, length: 70_000 }, // touches the first run's end
    { pattern: 0x43, offset: 3 * MIB - 1, length: 2 }, // straddles a MiB boundary
    { pattern: 0x44, offset: 5 * MIB + 511, length: 1 * MIB + 3 },
    { pattern: 0x45, offset: IO_BYTES - 777, length: 777 }, // ends at the volume's end
    { pattern: 0x46, offset: 2000, length: 1 }, // overwrite inside the first run
  ];
  for (const write of writes) model.fill(write.pattern, write.offset, write.offset + write.length);
  await qemuIoOk(uri, [...writes.map((w) => `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`), "flush"]);
  await qemuIoOk(uri, [
    "read -P 0x41 1000 1000",
    "read -P 0x46 2000 1",
    "read -P 0x41 2001 3999",
    "read -P 0x42 6000 70000",
    "read -P 0x00 0 1000",
    `read -P 0x00 76000 ${3 * MIB - 1 - 76_000}`,
    `read -P 0x43 ${3 * MIB - 1} 2`,
    `read -P 0x44 ${5 * MIB + 511} ${1 * MIB + 3}`,
    `read -P 0x45 ${IO_BYTES - 777} 777`,
  ]);
  // A wrong expectation must fail: proves qemu-io's verification is live.
  const wrong = await qemuIo(uri, ["read -P 0x41 6000 10"]);
  assert.notEqual(wrong.code, 0, `a wrong pattern passed: ${describeResult(wrong)}`);
  assert.match(wrong.stdout + wrong.stderr, /Pattern verification failed/);

  const actual = await readExport(uri);
  assert.ok(actual.equals(model), firstDifference(actual, model));
});

test("qemu-io asynchronous writes, aio_flush, asynchronous reads", async () => {
  const uri = target.uri("aio");
  const model = Buffer.alloc(AIO_BYTES);
  const commands: string[] = [];
  // 48 writes in flight at once, at unaligned offsets, each in its own slot.
  for (let i = 0; i < 48; i++) {
    const offset = i * 150_001 + (i % 7) * 13;
    const length = 4096 + i * 37;
    const pattern = 0x10 + i;
    model.fill(pattern, offset, offset + length);
    commands.push(`aio_write -P 0x${pattern.toString(16)} ${offset} ${length}`);
  }
  commands.push("aio_flush");
  for (let i = 0; i < 48; i++) {
    const offset = i * 150_001 + (i % 7) * 13;
    commands.push(`aio_read -P 0x${(0x10 + i).toString(16)} ${offset} ${4096 + i * 37}`);
  }
  commands.push("aio_flush");
  const result = await qemuIoOk(uri, commands);
  assert.equal((result.stdout.match(/^wrote /gm) ?? []).length, 48, result.stdout);
  assert.equal((result.stdout.match(/^read /gm) ?? []).length, 48, result.stdout);
  const actual = await readExport(uri);
  assert.ok(actual.equals(model), firstDifference(actual, model));
});
