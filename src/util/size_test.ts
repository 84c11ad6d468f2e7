// Proves the SIZE syntax of the CLI contract (bytes, or K/M/G/T as powers of
// 1024) and that bad sizes are refused with a message naming the field and
// the value, never silently rounded.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { formatSize, formatSizeExact, formatSizesDistinct, parsePartitionSizes, parseSize } from "./size.ts";
import { UsageError } from "./errors.ts";

test("parseSize accepts bytes and binary suffixes", () => {
  assert.equal(parseSize("0", "--capacity"), 0);
  assert.equal(parseSize("4096", "--capacity"), 4096);
  assert.equal(parseSize("1K", "--capacity"), 1024);
  assert.equal(parseSize("64M", "--capacity"), 64 * 1024 ** 2);
  assert.equal(parseSize("80G", "--capacity"), 80 * 1024 ** 3);
  assert.equal(parseSize("2T", "--capacity"), 2 * 1024 ** 4);
  assert.equal(parseSize("1.5g", "--capacity"), 1.5 * 1024 ** 3);
  assert.equal(parseSize("10MiB", "--capacity"), 10 * 1024 ** 2);
});

test("parseSize refuses bad input naming the field and value", () => {
  for (const bad of ["", "G", "-1", "1X", "1.3K", "12 34", "1e9", "99999999999999999999"]) {
    assert.throws(
      () => parseSize(bad, "--volume"),
      (error: unknown) =>
        error instanceof UsageError && error.message.includes("--volume") && error.message.includes(`"${bad}"`),
      `input ${JSON.stringify(bad)}`,
    );
  }
});

test("formatSize is exact on whole multiples and parses back", () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 1023 }), fc.constantFrom(1, 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4), (n, unit) => {
      const bytes = n * unit;
      assert.equal(parseSize(formatSize(bytes), "x"), bytes);
    }),
  );
  assert.equal(formatSize(1536), "1.5K");
  assert.equal(formatSize(1025), "1K");
  assert.equal(formatSize(0), "0");
});

test("sizes side by side differ in print when they differ in bytes", () => {
  assert.deepEqual(formatSizesDistinct([4 * 2 ** 30, 4092 * 2 ** 20]), ["4G", "4092M"]);
  assert.deepEqual(formatSizesDistinct([80 * 2 ** 30, 20 * 2 ** 30]), ["80G", "20G"]);
  assert.equal(formatSizeExact(1536 * 1024), "1536K");
  assert.equal(formatSizeExact(1000), "1000");
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 2 ** 44 }), fc.integer({ min: 0, max: 2 ** 44 }), (a, b) => {
      const [x, y] = formatSizesDistinct([a, b]);
      if (a !== b) assert.notEqual(x, y);
      assert.equal(parseSize(formatSizeExact(a), "--size"), a);
    }),
  );
});

test("partition sizes: one grammar for both commands (arguments, commas, or both; none clears)", () => {
  const G = 2 ** 30;
  for (const args of [["1G", "2G"], ["1G,2G"], ["1G,", "2G"], ["1G, 2G"]]) assert.deepEqual(parsePartitionSizes(args), [G, 2 * G], JSON.stringify(args));
  assert.deepEqual(parsePartitionSizes(["none"]), []);
  assert.deepEqual(parsePartitionSizes([]), []);
  assert.throws(() => parsePartitionSizes(["1G", "2X"]), /SIZE #2/);
});
