// Issue 11, the client side: the one station client (src/host/station_client.ts),
// and through it the admin CLI and `ipsan host`, given several stations
// (`--station URL,URL`, $IPSAN_STATION, the host's stored credential) tries
// them in order, starting with the last that answered. Real stations: s1 and
// s2 start from one state (s2 on a copy of s1's data dir, as stations sharing
// etcd will), then diverge on purpose so that each answers differently:
// - a refused connection on the first URL is skipped (client, admin CLI, env,
//   the agent's source address toward the station);
// - a 503 is skipped: s1 holds unit u's old control address (503 "unit
//   unreachable" on refresh), s2 its new one (200);
// - a 4xx is final: a host registered at s2 only is a 404 at s1, and the
//   call fails with it instead of asking s2;
// - a station that accepts connections but never answers (SIGSTOP): a GET and
//   a POST with a requestId move on after their share of the timeout; a POST
//   without a requestId does not (it may have reached the station);
// - s1 stopped: `ipsan host register` / `request` with the list go through s2,
//   and the stored credential keeps the list;
// - both stopped: the error names every station and why it failed.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startStation, type RunningStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";
import { freeTcpPort } from "../testing/daemon.ts";
import { run } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { IPSAN_BIN, type RunningUnit } from "../testing/unit.ts";
import { IpsanError } from "../util/errors.ts";
import { StationClient, StationError, parseStationUrls, sourceAddressToward } from "./station_client.ts";

const tmp = makeTempDir("several-stations-client", memoryTmpBase());
let s1: RunningStation;
let s2: RunningStation;
let unit: RunningUnit | undefined;
/** A loopback URL where nothing listens (connection refused). */
let dead: string;
const closers: (() => Promise<unknown>)[] = [];

before(async () => {
  const dir1 = tmp.file("s1");
  const first = await startStation({ dataDir: dir1, keepData: true });
  closers.push(() => first.close());
  const unitDir = tmp.file("u");
  const before = await startJoinedUnit(first, { name: "u", capacity: "64M", dataDir: unitDir });
  await before.kill9();
  await first.stop();
  cpSync(dir1, tmp.file("s2"), { recursive: true });
  s1 = await startStation({ dataDir: dir1, keepData: true });
  s2 = await startStation({ dataDir: tmp.file("s2"), keepData: true });
  closers.push(() => s1.close(), () => s2.close());
  // The unit comes back on a new control port and joins s2 only: s1 keeps its old, dead control address.
  unit = await startJoinedUnit(s2, { name: "u", capacity: "64M", dataDir: unitDir });
  closers.push(async () => unit?.close());
  dead = `http://127.0.0.1:${await freeTcpPort()}`;
});

after(async () => {
  for (const close of closers.reverse()) await close().catch(() => undefined);
  tmp.remove();
});

function client(urls: readonly string[], timeoutMs?: number): StationClient {
  return new StationClient({ baseUrl: parseStationUrls(urls.join(",")), token: s1.token(), ...(timeoutMs === undefined ? {} : { timeoutMs }) });
}

function ipsan(args: readonly string[], env: Readonly<Record<string, string>> = {}): ReturnType<typeof run> {
  return run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 60_000, env: { XDG_CONFIG_HOME: tmp.file("xdg"), ...env } });
}

test("--station grammar: a comma-separated list of at most 16 URLs, each checked, none twice", () => {
  assert.deepEqual(parseStationUrls("http://a:1, https://b:2/").map((u) => u.href), ["http://a:1/", "https://b:2/"]);
  const sixteen = Array.from({ length: 16 }, (_, i) => `http://127.0.0.${i + 1}:8640`).join(",");
  assert.equal(parseStationUrls(sixteen).length, 16);
  assert.throws(() => parseStationUrls(`${sixteen},http://127.0.0.99:8640`), /--station: 17 URLs, more than 16/);
  assert.throws(() => parseStationUrls("http://a:1,,http://b:2"), /--station: empty URL in/);
  assert.throws(() => parseStationUrls("http://a:1,http://a:1/"), /--station: "http:\/\/a:1\/" is given twice/);
  assert.throws(() => parseStationUrls("http://a:1,127.0.0.1:8641"), /--station: unsupported scheme in "127\.0\.0\.1:8641"|--station: invalid URL "127\.0\.0\.1:8641"/);
});

test("a refused connection on the first URL is skipped (client, admin CLI, $IPSAN_STATION)", { timeout: 60_000 }, async () => {
  const c = client([dead, s1.url]);
  const units = await c.units();
  assert.deepEqual(units.map((u) => u.name), ["u"]);
  assert.equal(c.baseUrl.origin, new URL(s1.url).origin, "the next call starts with the station that answered");
  const token = join(s1.dataDir, "admin.token");
  const cli = await ipsan(["units", "--station", `${dead},${s1.url}`, "--token-file", token, "--json"]);
  assert.equal(cli.code, 0, cli.stderr);
  const env = await ipsan(["units", "--token-file", token, "--json"], { IPSAN_STATION: `${dead},${s1.url}` });
  assert.equal(env.code, 0, env.stderr);
  assert.equal(env.stdout, cli.stdout);
  // The agent's address toward the station (no --address): from the first station that accepts a connection.
  assert.equal(await sourceAddressToward(parseStationUrls(`${dead},${s1.url}`), 4_000), "127.0.0.1");
});

test("a 503 is skipped: the next station answers", { timeout: 60_000 }, async () => {
  // Each station on its own: s1 cannot reach the unit's control API (503), s2 can.
  assert.equal((await s1.api("POST", "/api/v1/units/u/refresh", {})).status, 503);
  assert.equal((await s2.api("POST", "/api/v1/units/u/refresh", {})).status, 200);
  const c = client([s1.url, s2.url]);
  const refreshed = (await c.call("POST", "/api/v1/units/u/refresh", {})) as { name: string };
  assert.equal(refreshed.name, "u");
  assert.equal(c.baseUrl.origin, new URL(s2.url).origin);
});

test("a 4xx is final: the call fails with it and does not ask the next station", { timeout: 60_000 }, async () => {
  assert.equal((await s2.api("PUT", "/api/v1/hosts/only2", { address: "127.0.0.42" })).status, 201);
  const c = client([s1.url, s2.url]);
  await assert.rejects(c.call("GET", "/api/v1/hosts/only2"), (error: unknown) => error instanceof StationError && error.status === 404);
  assert.equal(c.baseUrl.origin, new URL(s1.url).origin);
  // Told s2 first, it answers.
  assert.equal(((await client([s2.url, s1.url]).call("GET", "/api/v1/hosts/only2")) as { name: string }).name, "only2");
});

test("a station that never answers: GET and a POST with a requestId move on after their share of the timeout; a POST without one does not", { timeout: 60_000 }, async () => {
  assert.equal((await s2.api("PUT", "/api/v1/hosts/h-stop", { address: "127.0.0.43" })).status, 201);
  process.kill(s1.pid, "SIGSTOP");
  try {
    const c = client([s1.url, s2.url], 4_000);
    const started = Date.now();
    assert.deepEqual((await c.units()).map((u) => u.name), ["u"]);
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 1_500 && elapsed < 4_000, `moved on after ${elapsed} ms (half of 4,000 for the first of two stations)`);
    const allocated = (await client([s1.url, s2.url], 4_000).allocate({ requestId: "several-stop-1", host: "h-stop", sizeBytes: 4 * 1024 * 1024 })) as { id: string };
    assert.equal((await s2.api("GET", `/api/v1/assignments/${allocated.id}`)).status, 200, "allocated at s2");
    await assert.rejects(client([s1.url, s2.url], 4_000).heartbeat("h-stop"), (error: unknown) => {
      assert.ok(error instanceof IpsanError && error.code === "UNAVAILABLE");
      assert.match(error.message, new RegExp(`POST /api/v1/hosts/h-stop/heartbeat: no station answered: ${new URL(s1.url).origin} \\(timeout: no answer within [0-9]+ ms\\); not tried: ${new URL(s2.url).origin}`));
      assert.match(error.message, /it may have reached the station, so it is not sent to another/);
      return true;
    });
  } finally {
    process.kill(s1.pid, "SIGCONT");
  }
});

test("one station stopped: ipsan host register and request with the list go through the other, and the credential keeps the list", { timeout: 90_000 }, async () => {
  await s1.stop();
  const list = `${s1.url},${s2.url}`;
  const token = join(s2.dataDir, "admin.token");
  const join1 = await ipsan(["hosts", "token", "create", "--host", "hl", "--expires", "10m", "--json", "--station", list, "--token-file", token]);
  assert.equal(join1.code, 0, join1.stderr);
  writeFileSync(tmp.file("hl.join"), `${(JSON.parse(join1.stdout) as { token: string }).token}\n`, { mode: 0o600 });
  const state = tmp.file("hl-state");
  const registered = await ipsan(["host", "register", "--station", list, "--token-file", tmp.file("hl.join"), "--host", "hl", "--address", "127.0.0.44", "--state-dir", state, "--json"]);
  assert.equal(registered.code, 0, registered.stderr);
  const credential = JSON.parse(readFileSync(join(state, "credential.json"), "utf8")) as { station: string };
  assert.equal(credential.station, `${new URL(s1.url).href},${new URL(s2.url).href}`);
  const requested = await ipsan(["host", "request", "--size", "4M", "--state-dir", state, "--json"]);
  assert.equal(requested.code, 0, requested.stderr);
  assert.equal((JSON.parse(requested.stdout) as { host: string }).host, "hl");
});

test("every station down: the error names each and why it failed", { timeout: 60_000 }, async () => {
  await s2.stop();
  const started = Date.now();
  await assert.rejects(client([s1.url, s2.url, dead], 3_000).units(), (error: unknown) => {
    assert.ok(error instanceof IpsanError && error.code === "UNAVAILABLE");
    for (const url of [s1.url, s2.url, dead]) assert.match(error.message, new RegExp(`${new URL(url).origin} \\(ECONNREFUSED: `));
    assert.match(error.message, /GET \/api\/v1\/units: no station answered: .*\[[0-9]+ passes over 3 stations in [0-9]+ ms\]/);
    return true;
  });
  assert.ok(Date.now() - started < 3_500, "within the call's timeout");
});
