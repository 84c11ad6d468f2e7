// The legs file and the status file between the host agent and a mirror's
// engine (src/host/legs.ts): a good legs file parses to its legs; every kind
// of bad input is refused with a reason that names the field (never a throw,
// never a half-parsed list); the size bound holds; a status file the engine
// would write parses, and a malformed one is refused by field; legChanges
// tells the agent which leg positions the station changed (by index: same
// volume = same leg). writeFileAtomic leaves the old file or the new, and no
// temporary file behind.

import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { legChanges } from "./attach.ts";
import { LEGS_FILE_BYTES_MAX, parseLegsFile, parseStatusFile, readLegsFile, writeFileAtomic } from "./legs.ts";

const A = { id: "vol-a", uri: "nbd://127.0.0.1:10809/vol-a", unit: "u1", volume: "vol-a" };
const B = { id: "vol-b", uri: "nbd+unix:///vol-b?socket=/run/u2.sock" };

test("a legs file parses to its legs, in order, with unit and volume when given", () => {
  const parsed = parseLegsFile(JSON.stringify([A, B]));
  assert.deepEqual(parsed, { kind: "ok", value: [A, B] });
});

test("bad legs files are refused with a reason naming the field", () => {
  const cases: [string, RegExp][] = [
    ["", /not JSON/],
    ["{", /not JSON/],
    ['{"id":"a"}', /expected a JSON list/],
    ["[]", /1 to 3 legs, not 0/],
    [JSON.stringify([A, B, { ...A, id: "c" }, { ...A, id: "d" }]), /1 to 3 legs, not 4/],
    ["[5]", /legs\[0\]: expected an object/],
    ["[null]", /legs\[0\]: expected an object/],
    [JSON.stringify([{ uri: A.uri }]), /legs\[0\]\.id/],
    [JSON.stringify([{ id: "-a", uri: A.uri }]), /legs\[0\]\.id/],
    [JSON.stringify([{ id: "a b", uri: A.uri }]), /legs\[0\]\.id/],
    [JSON.stringify([{ id: "x".repeat(64), uri: A.uri }]), /legs\[0\]\.id/],
    [JSON.stringify([A, { id: "b" }]), /legs\[1\]\.uri: expected an NBD URI/],
    [JSON.stringify([{ id: "a", uri: "http://x/y" }]), /legs\[0\]\.uri: .*unsupported scheme/],
    [JSON.stringify([{ id: "a", uri: "nbd+unix:///v" }]), /legs\[0\]\.uri: .*socket/],
    [JSON.stringify([A, { ...B, id: A.id }]), /legs\[1\]\.id: vol-a appears twice/],
    [JSON.stringify([{ ...A, unit: 3 }]), /legs\[0\]\.unit/],
    [JSON.stringify([{ ...A, volume: "" }]), /legs\[0\]\.volume/],
    [JSON.stringify([{ ...A, extra: 1 }]), /legs\[0\]\.extra: unknown field/],
  ];
  for (const [text, reason] of cases) {
    const parsed = parseLegsFile(text);
    assert.equal(parsed.kind, "invalid", `${text} was accepted`);
    assert.match(parsed.kind === "invalid" ? parsed.reason : "", reason, text);
  }
});

test("a legs file larger than the bound is refused before it is parsed, and readLegsFile names the file", async () => {
  const big = JSON.stringify([{ ...A, volume: "v" }]) + " ".repeat(LEGS_FILE_BYTES_MAX);
  const parsed = parseLegsFile(big);
  assert.ok(parsed.kind === "invalid" && /larger than/.test(parsed.reason));
  const dir = makeTempDir("legs-file", memoryTmpBase());
  try {
    const path = dir.file("legs.json");
    await writeFileAtomic(path, big);
    await assert.rejects(readLegsFile(path), (error: Error) => error.message.includes(path) && /larger than/.test(error.message));
    await writeFileAtomic(path, "[1]");
    await assert.rejects(readLegsFile(path), (error: Error) => error.message.includes(path) && /legs\[0\]/.test(error.message));
    await writeFileAtomic(path, JSON.stringify([A]));
    assert.deepEqual(await readLegsFile(path), [A]);
    assert.equal(readFileSync(path, "utf8"), JSON.stringify([A]));
    assert.deepEqual(readdirSync(dir.path), ["legs.json"], "no temporary file left behind");
  } finally {
    dir.remove();
  }
});

test("status files: the engine's form parses; malformed ones are refused by field", () => {
  const good = {
    generation: 7,
    updatedAt: "2026-01-01T00:00:00.000Z",
    legs: [
      { id: "vol-a", uri: A.uri, unit: "u1", volume: "vol-a", state: "in-sync", rebuild: null, error: null },
      { id: "vol-c", uri: A.uri, unit: "u3", volume: "vol-c", state: "rebuilding", rebuild: { kind: "full", copiedBytes: 1048576, totalBytes: 67108864, etaSeconds: null }, error: null },
    ],
  };
  assert.deepEqual(parseStatusFile(JSON.stringify(good)), { kind: "ok", value: good });
  const leg = good.legs[1] as (typeof good.legs)[number];
  const cases: [unknown, RegExp][] = [
    [{ ...good, generation: -1 }, /generation/],
    [{ ...good, generation: 1.5 }, /generation/],
    [{ ...good, updatedAt: 5 }, /updatedAt/],
    [{ ...good, legs: [] }, /legs: expected 1 to 3/],
    [{ ...good, legs: [{ ...leg, state: "ok" }] }, /legs\[0\]\.state/],
    [{ ...good, legs: [{ ...leg, error: 5 }] }, /legs\[0\]\.error/],
    [{ ...good, legs: [{ ...leg, rebuild: { ...leg.rebuild, kind: "x" } }] }, /legs\[0\]\.rebuild\.kind/],
    [{ ...good, legs: [{ ...leg, rebuild: { ...leg.rebuild, copiedBytes: -1 } }] }, /legs\[0\]\.rebuild: copiedBytes/],
    [{ ...good, legs: [{ ...leg, rebuild: { ...leg.rebuild, etaSeconds: "soon" } }] }, /etaSeconds/],
  ];
  for (const [value, reason] of cases) {
    const parsed = parseStatusFile(JSON.stringify(value));
    assert.ok(parsed.kind === "invalid" && reason.test(parsed.reason), `${JSON.stringify(value).slice(0, 120)} -> ${JSON.stringify(parsed)}`);
  }
});

test("legChanges compares legs by position: same volume and URI is the same leg; another volume is a replacement; another URI a move", () => {
  const a = { name: "v1", uri: "nbd://10.0.0.1:10809/v1", unit: "u1", volume: "v1" };
  const b = { name: "v2", uri: "nbd://10.0.0.2:10809/v2", unit: "u2", volume: "v2" };
  const c = { name: "v9", uri: "nbd://10.0.0.3:10809/v9", unit: "u3", volume: "v9" };
  assert.deepEqual(legChanges([a, b], [a, b]), []);
  // A record from before leg replacement has no unit: same name and URI is still the same leg.
  assert.deepEqual(legChanges([{ name: "v1", uri: a.uri }, b], [a, b]), []);
  assert.deepEqual(legChanges([a, b], [a, c]), ["1: u2/v2 -> u3/v9"]);
  assert.deepEqual(legChanges([a, b], [{ ...a, uri: "nbd://10.0.0.7:10809/v1" }, b]), ["0: u1/v1 moved to nbd://10.0.0.7:10809/v1"]);
  assert.deepEqual(legChanges([a, b], [b, a]), ["0: u1/v1 -> u2/v2", "1: u2/v2 -> u1/v1"]);
});
