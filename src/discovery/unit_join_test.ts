// Proves that a fragmented unit still reports: past FREE_EXTENTS_MAX free
// extents, the storage info carries the largest ones in LBA order (the
// station plans with those and the exact freeBytes) instead of failing
// validation and never joining.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FREE_EXTENTS_MAX, type LbaExtent } from "./messages.ts";
import { largestFreeExtents, parseJoinFlags } from "./unit_join.ts";

const extent = (startLba: number, lengthLba: number): LbaExtent => ({ startLba, lengthLba, endLba: startLba + lengthLba - 1 });

test("free extents within the limit are reported as they are", () => {
  const extents = [extent(8192, 2048), extent(20480, 4096)];
  assert.equal(largestFreeExtents(extents), extents);
});

test("past the limit the largest extents are kept, in LBA order", () => {
  const count = FREE_EXTENTS_MAX + 500;
  // Every other MiB free; lengths vary so the largest are spread over the disk.
  const extents = Array.from({ length: count }, (_, i) => extent(8192 + i * 8192, 2048 * (1 + (i * 7919) % 3)));
  const kept = largestFreeExtents(extents);
  assert.equal(kept.length, FREE_EXTENTS_MAX);
  const smallestKept = Math.min(...kept.map((e) => e.lengthLba));
  const dropped = extents.filter((e) => !kept.includes(e));
  assert.equal(dropped.length, 500);
  assert.ok(dropped.every((e) => e.lengthLba <= smallestKept), "only the smallest are dropped");
  for (let i = 1; i < kept.length; i++) assert.ok(kept[i - 1]!.startLba < kept[i]!.startLba, "LBA order");
});

// Issue 11: --discovery HOST:PORT[,HOST:PORT...] (and its old spelling --station), every station's discovery address.
test("--discovery takes a comma-separated list of up to 16 addresses, each checked as one is", () => {
  const key = { "cluster-key-file": "/k" };
  const parsed = parseJoinFlags({ discovery: "127.0.0.1:8641, station-b:8641,127.0.0.2:9", ...key });
  assert.deepEqual(parsed?.stations, [
    { host: "127.0.0.1", port: 8641 },
    { host: "station-b", port: 8641 },
    { host: "127.0.0.2", port: 9 },
  ]);
  const notes: string[] = [];
  assert.deepEqual(parseJoinFlags({ station: "10.0.0.1:8641,10.0.0.2:8641", ...key }, (line) => notes.push(line))?.stations, [
    { host: "10.0.0.1", port: 8641 },
    { host: "10.0.0.2", port: 8641 },
  ]);
  assert.equal(notes.length, 1, "one deprecation note for the old spelling");
  const sixteen = Array.from({ length: 16 }, (_, i) => `127.0.0.${i + 1}:8641`).join(",");
  assert.equal(parseJoinFlags({ discovery: sixteen, ...key })?.stations.length, 16);
  const refused: [string, RegExp][] = [
    [`${sixteen},127.0.0.99:8641`, /--discovery: 17 addresses, more than 16/],
    ["127.0.0.1:8641,,127.0.0.2:8641", /--discovery: empty address in/],
    ["127.0.0.1:8641,127.0.0.1:8641", /--discovery: "127\.0\.0\.1:8641" is given twice/],
    ["127.0.0.1:8641,127.0.0.2:0", /--discovery: port 0 in "127\.0\.0\.2:0"/],
    ["127.0.0.1:8641,http://127.0.0.2:8640", /--discovery: "http:\/\/127\.0\.0\.2:8640" is a URL; a unit joins through each station's UDP discovery address/],
    ["127.0.0.1:8641,nowhere", /--discovery: invalid address "nowhere"/],
    ["127.0.0.1:8641,[::1]:8641", /mixes IPv4 and IPv6 addresses/],
  ];
  for (const [text, message] of refused) assert.throws(() => parseJoinFlags({ discovery: text, ...key }), message, text);
});
