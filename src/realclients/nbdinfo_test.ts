// nbdinfo (libnbd's own inspector) against a real `ipsan unit`: the export list
// carries every volume with its exact size; one export's --json shows every
// flag ipsan must advertise (writable, flush, FUA, trim, zero, fast zero,
// cache, DF, multi-conn, base:allocation, block sizes 512/4096/32M); and
// --map, after writes at known offsets, shows data exactly there and holes
// everywhere else, with the boundaries where we wrote. Then the unit stops on
// SIGTERM with exit status 0.
// Run with IPSAN_REALCLIENTS_SERVER=nbdkit to check these tests against nbdkit.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { EXTENT_HOLE, EXTENT_ZERO, mergeExtents, nbdinfoJson, nbdinfoList, nbdinfoMap, nbdsh } from "../testing/clients.ts";
import { startTarget, type Target } from "../testing/target.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
const VOLUMES = [
  { name: "alpha", sizeBytes: 64 * MIB },
  { name: "beta", sizeBytes: 40 * MIB },
  { name: "gamma.v-1", sizeBytes: 1536 * KIB },
] as const;

let target: Target;
before(async () => {
  target = await startTarget({ volumes: VOLUMES });
});
after(async () => {
  await target?.close();
});

test("nbdinfo --list shows every volume with its exact size", async () => {
  const report = await nbdinfoList(target.listUri());
  assert.equal(report.protocol, "newstyle-fixed");
  const sizes = Object.fromEntries(report.exports.map((entry) => [entry["export-name"], entry["export-size"]]));
  assert.deepEqual(sizes, Object.fromEntries(VOLUMES.map((volume) => [volume.name, volume.sizeBytes])));
});

test("nbdinfo --json shows every flag ipsan advertises", async () => {
  const report = await nbdinfoJson(target.uri("alpha"));
  assert.equal(report.protocol, "newstyle-fixed");
  assert.equal(report.structured, true, "structured replies negotiated");
  assert.equal(report.exports.length, 1);
  const info = report.exports[0];
  assert.ok(info !== undefined);
  assert.equal(info["export-name"], "alpha");
  assert.equal(info["export-size"], 64 * MIB);
  assert.deepEqual(
    {
      is_read_only: info.is_read_only,
      can_flush: info.can_flush,
      can_fua: info.can_fua,
      can_trim: info.can_trim,
      can_zero: info.can_zero,
      can_fast_zero: info.can_fast_zero,
      can_cache: info.can_cache,
      can_df: info.can_df,
      can_multi_conn: info.can_multi_conn,
      block_size_minimum: info.block_size_minimum,
      block_size_preferred: info.block_size_preferred,
      block_size_maximum: info.block_size_maximum,
    },
    {
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      can_fast_zero: true,
      can_cache: true,
      can_df: true,
      can_multi_conn: true,
      block_size_minimum: 512,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MIB,
    },
  );
  assert.ok(info.contexts?.includes("base:allocation"), `contexts: ${JSON.stringify(info.contexts)}`);
});

test("nbdinfo --map shows data exactly where we wrote and holes elsewhere", async () => {
  const uri = target.uri("beta");
  const size = 40 * MIB;
  const hole = EXTENT_HOLE | EXTENT_ZERO;
  assert.deepEqual(mergeExtents(await nbdinfoMap(uri)), [{ offset: 0, length: size, type: hole }], "a new volume is one hole");

  const writes = [
    { offset: 1 * MIB, length: 64 * KIB },
    { offset: 8 * MIB, length: 4 * KIB },
    { offset: 20 * MIB - 128 * KIB, length: 256 * KIB },
    { offset: size - 1 * MIB, length: 1 * MIB },
  ];
  const script = writes.map((write) => `h.pwrite(b"\\xa5" * ${write.length}, ${write.offset})`).join("\n") + "\nh.flush()";
  await nbdsh(uri, script);

  const expected: { offset: number; length: number; type: number }[] = [];
  let cursor = 0;
  for (const write of writes) {
    if (write.offset > cursor) expected.push({ offset: cursor, length: write.offset - cursor, type: hole });
    expected.push({ offset: write.offset, length: write.length, type: 0 });
    cursor = write.offset + write.length;
  }
  if (cursor < size) expected.push({ offset: cursor, length: size - cursor, type: hole });
  assert.deepEqual(mergeExtents(await nbdinfoMap(uri)), expected);
  // The neighbouring volume saw none of it.
  assert.deepEqual(mergeExtents(await nbdinfoMap(target.uri("alpha"))), [{ offset: 0, length: 64 * MIB, type: hole }]);
});

test("the unit exits 0 on SIGTERM", async (t) => {
  const unit = target.unit;
  if (unit === undefined) {
    t.skip("IPSAN_REALCLIENTS_SERVER=nbdkit: no unit to stop");
    return;
  }
  const status = await unit.stop();
  assert.deepEqual(status, { code: 0, signal: null, forced: false }, unit.stderr());
});
