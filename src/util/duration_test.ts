import assert from "node:assert/strict";
import { test } from "node:test";
import { DURATION_MS_MAX, formatDuration, parseDuration } from "./duration.ts";
import { UsageError } from "./errors.ts";

test("parseDuration takes a number with ms, s, m or h", () => {
  assert.equal(parseDuration("250ms", "--x"), 250);
  assert.equal(parseDuration("3s", "--x"), 3000);
  assert.equal(parseDuration("1.5s", "--x"), 1500);
  assert.equal(parseDuration("5m", "--x"), 300_000);
  assert.equal(parseDuration(" 2h ", "--x"), 7_200_000);
  assert.equal(parseDuration("30d".replace("30d", "720h"), "--x"), DURATION_MS_MAX);
});

test("parseDuration refuses bare numbers, other units, zero, fractions of a millisecond and huge values, naming the flag", () => {
  for (const bad of ["5", "", "s", "-3s", "3 s", "3sec", "1d", "0s", "0.5ms", "721h", "1e3s", "NaNs"]) {
    assert.throws(() => parseDuration(bad, "--replace-after"), (error: unknown) => error instanceof UsageError && error.message.startsWith("--replace-after: ") && error.message.includes(JSON.stringify(bad)), bad);
  }
});

test("formatDuration is the shortest exact form and parses back", () => {
  for (const [ms, text] of [[250, "250ms"], [1500, "1.5s"], [3000, "3s"], [300_000, "5m"], [90_000, "1.5m"], [7_200_000, "2h"], [1001, "1001ms"]] as const) {
    assert.equal(formatDuration(ms), text);
    assert.equal(parseDuration(text, "--x"), ms);
  }
});
