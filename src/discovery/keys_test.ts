// What this proves: the cluster key file is created once, 0600, 64 hex
// digits, and loaded back identically; racing creators end up with one key;
// bad key files are refused with a message naming the file; the derived
// control token is exactly hex(HMAC-SHA256(key, "ipsan-control-token:" + name))
// as contracts.md says, and differs per unit and from the packet key. Also
// the liveness timers: environment overrides, scaling, and refusal of timers
// that do not fit together.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { controlTokenFor, loadClusterKey, loadOrCreateClusterKey, packetKeyFor, parseClusterKey } from "./keys.ts";
import { livenessTimersFromEnv, checkLivenessTimers, backoffDelayMs, DEFAULT_BACKOFF } from "./timers.ts";
import { makeTempDir } from "../testing/tmp.ts";

const tmp = makeTempDir("keys");
after(() => tmp.remove());

test("created once, mode 0600, 32 bytes as hex; loaded back the same; racing creators agree", async () => {
  const path = tmp.file("cluster.key");
  const keys = await Promise.all(Array.from({ length: 8 }, () => loadOrCreateClusterKey(path)));
  const first = keys[0];
  assert.ok(first !== undefined && first.length === 32);
  for (const key of keys) assert.ok(key.equals(first));
  assert.equal(statSync(path).mode & 0o777, 0o600);
  assert.match(readFileSync(path, "utf8"), /^[0-9a-f]{64}\n$/);
  assert.ok((await loadClusterKey(path)).equals(first));
  assert.ok((await loadOrCreateClusterKey(path)).equals(first), "an existing key is never replaced");
});

test("bad key files are refused, naming the file", async () => {
  const short = tmp.file("short.key");
  writeFileSync(short, "abcd\n", { mode: 0o600 });
  await assert.rejects(loadClusterKey(short), /cluster key .*short\.key: expected 64 hex digits, got 4 characters/);
  await assert.rejects(loadClusterKey(tmp.file("missing.key")), /cluster key .*missing\.key: ENOENT/);
  const big = tmp.file("big.key");
  writeFileSync(big, "a".repeat(5000));
  await assert.rejects(loadClusterKey(big), /is not a key file/);
  assert.throws(() => parseClusterKey("zz".repeat(32), "x"), /expected 64 hex digits/);
});

test("controlTokenFor is hex(HMAC-SHA256(key, 'ipsan-control-token:' + name)), distinct per unit", () => {
  const key = Buffer.alloc(32, 7);
  const expected = createHmac("sha256", key).update("ipsan-control-token:u1").digest("hex");
  assert.equal(controlTokenFor(key, "u1"), expected);
  assert.notEqual(controlTokenFor(key, "u1"), controlTokenFor(key, "u2"));
  assert.notEqual(controlTokenFor(key, "u1"), packetKeyFor(key).toString("hex"));
  assert.equal(packetKeyFor(key).length, 32);
});

test("liveness timers: defaults, environment, scaling, consistency checks; backoff grows with jitter", () => {
  assert.deepEqual(livenessTimersFromEnv({}), { heartbeatIntervalMs: 1000, suspectAfterMs: 3000, offlineAfterMs: 10_000 });
  assert.deepEqual(livenessTimersFromEnv({ IPSAN_DISCOVERY_HEARTBEAT_MS: "100" }), { heartbeatIntervalMs: 100, suspectAfterMs: 300, offlineAfterMs: 1000 });
  assert.deepEqual(
    livenessTimersFromEnv({ IPSAN_DISCOVERY_HEARTBEAT_MS: "100", IPSAN_DISCOVERY_SUSPECT_MS: "250", IPSAN_DISCOVERY_OFFLINE_MS: "900" }),
    { heartbeatIntervalMs: 100, suspectAfterMs: 250, offlineAfterMs: 900 },
  );
  assert.throws(() => livenessTimersFromEnv({ IPSAN_DISCOVERY_HEARTBEAT_MS: "soon" }), /IPSAN_DISCOVERY_HEARTBEAT_MS: invalid milliseconds "soon"/);
  assert.throws(() => checkLivenessTimers({ heartbeatIntervalMs: 1000, suspectAfterMs: 1500, offlineAfterMs: 5000 }), /suspectAfterMs: 1500 must be at least 2 heartbeats/);
  assert.throws(() => checkLivenessTimers({ heartbeatIntervalMs: 1000, suspectAfterMs: 3000, offlineAfterMs: 3000 }), /offlineAfterMs/);
  assert.throws(() => checkLivenessTimers({ heartbeatIntervalMs: 5, suspectAfterMs: 3000, offlineAfterMs: 5000 }), /heartbeatIntervalMs: 5 is outside/);
  const low = () => 0;
  const high = () => 0.999999;
  assert.equal(backoffDelayMs(DEFAULT_BACKOFF, 0, low), 200);
  assert.equal(backoffDelayMs(DEFAULT_BACKOFF, 0, high), 300);
  assert.equal(backoffDelayMs(DEFAULT_BACKOFF, 2, low), 800);
  assert.equal(backoffDelayMs(DEFAULT_BACKOFF, 10, high), 4800, "capped at maxMs (plus jitter)");
});
