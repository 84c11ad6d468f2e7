// Proves the unit's wipe (POST /v1/volumes/NAME/wipe and `ipsan unit volume
// wipe`) against a real `bin/ipsan unit` process with real clients: qemu-io
// fills two volumes with different patterns; wiping one makes every byte of
// it read as zeroes (qemu-io's pattern check over the whole volume, nbdinfo
// --map shows it as a hole) while the other keeps its pattern byte for byte.
// A wipe is refused with 409 naming the volume while the volume has a grant
// or an open connection (raw NBD probe holding the export), and succeeds once
// the connection is gone. 401 without or with a wrong token, 404 for an
// unknown volume or a wrong method, 400 naming the field for a bad name or a
// body with other fields. A ranged wipe ({offset, length}, what the
// station's volume.wipe task sends chunk by chunk) zeroes exactly that part
// and nothing around it; bad or out-of-bounds ranges are 400 naming offset or
// length, and it is refused while granted like a whole wipe. The offline admin (`--data`) wipes a stopped unit's
// volume, and the data is still zeroes after the unit starts again.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { openExport } from "../e2e/nbd_probe.ts";
import { EXTENT_HOLE, EXTENT_ZERO, mergeExtents, nbdinfoMap, qemuIo, qemuIoOk } from "../testing/clients.ts";
import { controlRequest } from "../testing/control.ts";
import { run, waitFor } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, startUnit, type RunningUnit } from "../testing/unit.ts";

const MIB = 1024 * 1024;
let dir: TempDir;
let unit: RunningUnit;

function ipsan(args: readonly string[], timeoutMs = 20_000) {
  return run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs });
}

function errorOf(body: unknown): { code?: string; message?: string; field?: string } {
  return ((body as { error?: unknown } | undefined)?.error ?? {});
}

before(async () => {
  dir = makeTempDir("wipe");
  unit = await startUnit({
    dataDir: dir.path,
    capacity: "64M",
    control: true,
    volumes: [
      { name: "a", size: "8M" },
      { name: "b", size: "8M" },
      { name: "c", size: "3M" },
    ],
  });
});

after(async () => {
  await unit?.close();
  dir?.remove();
});

test("wipe makes the whole volume read as zeroes and leaves the others alone", async () => {
  await qemuIoOk(unit.uri("a"), ["write -P 0xa5 0 8M"]);
  await qemuIoOk(unit.uri("b"), ["write -P 0x5b 0 8M"]);
  await qemuIoOk(unit.uri("a"), ["read -P 0xa5 0 8M"]);
  const wiped = await controlRequest(unit, "POST", "/v1/volumes/a/wipe");
  assert.equal(wiped.status, 200, JSON.stringify(wiped.body));
  const volume = wiped.body as { name: string; sizeBytes: number; grants: string[] };
  assert.equal(volume.name, "a");
  assert.equal(volume.sizeBytes, 8 * MIB);
  await qemuIoOk(unit.uri("a"), ["read -P 0 0 8M"]);
  const map = mergeExtents(await nbdinfoMap(unit.uri("a")));
  assert.deepEqual(map, [{ offset: 0, length: 8 * MIB, type: EXTENT_HOLE | EXTENT_ZERO }], "the wipe punched the whole volume");
  await qemuIoOk(unit.uri("b"), ["read -P 0x5b 0 8M"]);
  // A second wipe (a station retrying after a crash) is harmless.
  assert.equal((await controlRequest(unit, "POST", "/v1/volumes/a/wipe", {})).status, 200);
  await qemuIoOk(unit.uri("b"), ["read -P 0x5b 0 8M"]);
});

test("409 while the volume has a grant or an open connection; the data is kept", async () => {
  await qemuIoOk(unit.uri("c"), ["write -P 0x3c 0 3M"]);
  const granted = await controlRequest(unit, "PUT", "/v1/volumes/c/grants", { hosts: ["127.0.0.1"] });
  assert.equal(granted.status, 200, JSON.stringify(granted.body));
  const refused = await controlRequest(unit, "POST", "/v1/volumes/c/wipe");
  assert.equal(refused.status, 409, JSON.stringify(refused.body));
  assert.equal(errorOf(refused.body).code, "CONFLICT");
  assert.match(errorOf(refused.body).message ?? "", /volume c has grants \(127\.0\.0\.1\)/);
  await qemuIoOk(unit.uri("c"), ["read -P 0x3c 0 3M"]);
  assert.equal((await controlRequest(unit, "PUT", "/v1/volumes/c/grants", { hosts: [] })).status, 200);

  const opened = await openExport({ host: unit.host, port: unit.port, exportName: "c" });
  assert.equal(opened.kind, "open");
  if (opened.kind !== "open") return;
  try {
    assert.equal((await opened.client.read(0, 512)).readUInt8(0), 0x3c);
    const busy = await controlRequest(unit, "POST", "/v1/volumes/c/wipe");
    assert.equal(busy.status, 409, JSON.stringify(busy.body));
    assert.match(errorOf(busy.body).message ?? "", /volume c is open by 1 connection/);
    assert.equal((await opened.client.read(0, 512)).readUInt8(0), 0x3c, "the refused wipe changed nothing");
  } finally {
    opened.client.close();
  }
  // The unit notices the closed connection a moment later.
  await waitFor(
    "the wipe accepted once the connection is gone",
    async () => ((await controlRequest(unit, "POST", "/v1/volumes/c/wipe")).status === 200 ? true : undefined),
    { timeoutMs: 5_000 },
  );
  await qemuIoOk(unit.uri("c"), ["read -P 0 0 3M"]);
});

test("a ranged wipe zeroes exactly {offset, length} of the volume; bad ranges are 400 naming the field", async () => {
  assert.equal((await controlRequest(unit, "POST", "/v1/volumes", { name: "d", sizeBytes: 4 * MIB })).status, 201);
  await qemuIoOk(unit.uri("d"), ["write -P 0xd4 0 4M"]);
  const ranged = await controlRequest(unit, "POST", "/v1/volumes/d/wipe", { offset: MIB, length: MIB + 512 });
  assert.equal(ranged.status, 200, JSON.stringify(ranged.body));
  await qemuIoOk(unit.uri("d"), ["read -P 0xd4 0 1M", `read -P 0 1M ${MIB + 512}`, `read -P 0xd4 ${2 * MIB + 512} ${2 * MIB - 512}`]);
  const cases: [unknown, string, RegExp][] = [
    [{ offset: 1, length: MIB }, "offset", /offset: 1 is not a whole, non-negative multiple of 512 bytes/],
    [{ offset: -512, length: MIB }, "offset", /offset: -512/],
    [{ offset: 0, length: 100 }, "length", /length: 100 is not a multiple of 512/],
    [{ offset: 0, length: 2 * 1024 * MIB }, "length", /WIPE_RANGE_BYTES_MAX/],
    [{ offset: 3 * MIB, length: 2 * MIB }, "length", /past the end of volume d's extents \(4194304 bytes\)/],
    [{ offset: 0 }, "length", /length: required/],
  ];
  for (const [body, field, message] of cases) {
    const refused = await controlRequest(unit, "POST", "/v1/volumes/d/wipe", body);
    assert.equal(refused.status, 400, JSON.stringify(body));
    assert.equal(errorOf(refused.body).field, field, JSON.stringify(body));
    assert.match(errorOf(refused.body).message ?? "", message);
  }
  assert.equal((await controlRequest(unit, "PUT", "/v1/volumes/d/grants", { hosts: ["127.0.0.1"] })).status, 200);
  const granted = await controlRequest(unit, "POST", "/v1/volumes/d/wipe", { offset: 0, length: MIB });
  assert.equal(granted.status, 409);
  assert.match(errorOf(granted.body).message ?? "", /volume d has grants/);
  assert.equal((await controlRequest(unit, "PUT", "/v1/volumes/d/grants", { hosts: [] })).status, 200);
  // Nothing refused touched a byte.
  await qemuIoOk(unit.uri("d"), ["read -P 0xd4 0 1M", `read -P 0 1M ${MIB + 512}`, `read -P 0xd4 ${2 * MIB + 512} ${2 * MIB - 512}`]);
  assert.equal((await controlRequest(unit, "DELETE", "/v1/volumes/d")).status, 204);
});

test("401, 404 and 400 answers", async () => {
  for (const token of ["", "wrong-token-0123456789"]) {
    const r = await controlRequest(unit, "POST", "/v1/volumes/b/wipe", undefined, token);
    assert.equal(r.status, 401);
    assert.equal(errorOf(r.body).code, "UNAUTHENTICATED");
  }
  const missing = await controlRequest(unit, "POST", "/v1/volumes/nosuch/wipe");
  assert.equal(missing.status, 404);
  assert.match(errorOf(missing.body).message ?? "", /volume "nosuch" not found/);
  assert.equal((await controlRequest(unit, "GET", "/v1/volumes/b/wipe")).status, 404, "wipe is POST only");
  const badName = await controlRequest(unit, "POST", "/v1/volumes/-bad/wipe");
  assert.equal(badName.status, 400);
  assert.equal(errorOf(badName.body).field, "name");
  const withField = await controlRequest(unit, "POST", "/v1/volumes/b/wipe", { sizeBytes: 1 });
  assert.equal(withField.status, 400);
  assert.equal(errorOf(withField.body).field, "sizeBytes");
  assert.match(errorOf(withField.body).message ?? "", /unknown field \(expected no fields, or offset and length\)/);
  // None of these touched b.
  await qemuIoOk(unit.uri("b"), ["read -P 0x5b 0 8M"]);
});

test("ipsan unit volume wipe: online with --control, offline with --data", async () => {
  const online = ["--control", unit.controlUrl ?? "", "--token-file", `${dir.path}/control.token`];
  await qemuIoOk(unit.uri("a"), ["write -P 0x11 0 1M"]);
  const result = await ipsan(["unit", "volume", "wipe", ...online, "a"]);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^a\t1\t8388608\t8M\t/m);
  await qemuIoOk(unit.uri("a"), ["read -P 0 0 8M"]);

  const stopped = await unit.stop();
  assert.equal(stopped.code, 0);
  const offline = await ipsan(["unit", "volume", "wipe", "--data", dir.path, "b"]);
  assert.equal(offline.code, 0, offline.stderr);
  const unknown = await ipsan(["unit", "volume", "wipe", "--data", dir.path, "nosuch"]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /volume "nosuch" not found/);
  const usage = await ipsan(["unit", "volume", "wipe", "--data", dir.path]);
  assert.equal(usage.code, 2);
  unit = await startUnit({ dataDir: dir.path, capacity: "64M", control: true });
  await qemuIoOk(unit.uri("b"), ["read -P 0 0 8M"]);
  const stillData = await qemuIo(unit.uri("b"), ["read -P 0x5b 0 512"]);
  assert.match(stillData.stdout + stillData.stderr, /Pattern verification failed/, "b's old pattern is gone");
});
