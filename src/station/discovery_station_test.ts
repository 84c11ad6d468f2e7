// Proves issue 3's discovery promises through the real `ipsan station`
// process and its REST API (the discovery helper proves the listener on its
// own): a unit started with --station appears in GET /api/v1/units with its
// volumes within 2 s; a clean stop (SIGTERM, SHUTDOWN) shows it down within
// 1 s; after kill -9 it turns suspect, then offline, within the timers (short
// ones from the environment: heartbeat 100 ms, suspect 400 ms, offline 1000
// ms, which units adopt from the station's ACKs), and comes back online with
// its volumes when restarted; the event stream carries those state changes;
// forged, truncated and oversized datagrams change nothing and are counted by
// reason in /metrics.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import dgram from "node:dgram";
import { randomBytes } from "node:crypto";
import { waitFor } from "../testing/process.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { joinArgs } from "./pool_harness.ts";

const TIMERS = { IPSAN_DISCOVERY_HEARTBEAT_MS: "100", IPSAN_DISCOVERY_SUSPECT_MS: "400", IPSAN_DISCOVERY_OFFLINE_MS: "1000" };
let station: RunningStation;
const units: RunningUnit[] = [];

before(async () => {
  station = await startStation({ env: TIMERS });
});
after(async () => {
  for (const unit of units) await unit.close();
  await station?.close();
});

async function unitState(name: string): Promise<{ state: string; volumes: { name: string }[] } | undefined> {
  const response = await station.api("GET", `/api/v1/units/${name}`);
  return response.status === 200 ? (response.body as { state: string; volumes: { name: string }[] }) : undefined;
}

async function waitState(name: string, state: string, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  await waitFor(`unit ${name} ${state}`, async () => ((await unitState(name))?.state === state ? true : undefined), { timeoutMs, intervalMs: 20 });
  return Date.now() - t0;
}

function start(name: string, dataDir?: string): Promise<RunningUnit> {
  return startUnit({
    name,
    capacity: "64M",
    control: true,
    volumes: [{ name: "va", size: "4M" }, { name: "vb", size: "8M" }],
    extraArgs: joinArgs(station),
    env: TIMERS,
    ...(dataDir === undefined ? {} : { dataDir }),
  });
}

test("a unit appears with its volumes within 2 s; a clean stop shows it down within 1 s", async () => {
  const t0 = Date.now();
  const unit = await start("d1");
  units.push(unit);
  await waitFor(
    "d1 online with 2 volumes",
    async () => {
      const u = await unitState("d1");
      return u?.state === "online" && u.volumes.length === 2 ? true : undefined;
    },
    { timeoutMs: 2_000, intervalMs: 20 },
  );
  const joinedMs = Date.now() - t0;
  assert.ok(joinedMs <= 2_000, `joined in ${joinedMs} ms (including the unit's own start)`);
  const stopped = Date.now();
  const exit = await unit.stop();
  assert.equal(exit.code, 0);
  await waitState("d1", "down", 1_000);
  assert.ok(Date.now() - stopped <= 1_000 + 200, "down within 1 s of the stop");
});

test("kill -9: suspect, then offline within the timers; a restart brings it back online; the event stream saw it all", async () => {
  const controller = new AbortController();
  const stream = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${station.token()}` }, signal: controller.signal });
  const reader = stream.body?.getReader();
  let seen = "";
  const reading = (async () => {
    try {
      for (;;) {
        const next = await reader?.read();
        if (next === undefined || next.done) return;
        seen += Buffer.from(next.value).toString("utf8");
      }
    } catch {
      // aborted
    }
  })();
  const unit = await start("d2");
  units.push(unit);
  await waitState("d2", "online", 2_000);
  await unit.kill9();
  const t0 = Date.now();
  await waitState("d2", "suspect", 400 + 600);
  await waitState("d2", "offline", 1_000 + 600);
  assert.ok(Date.now() - t0 <= 1_000 + 600, `offline ${Date.now() - t0} ms after kill -9`);
  const again = await start("d2", unit.dataDir);
  units.push(again);
  await waitState("d2", "online", 2_000);
  assert.deepEqual((await unitState("d2"))?.volumes.map((v) => v.name).sort(), ["va", "vb"]);
  await waitFor("the stream saw the states", () => (/"subject":"d2","data":\{"name":"d2","state":"online","previousState":"offline"\}/.test(seen) ? true : undefined), {
    timeoutMs: 2_000,
  });
  controller.abort();
  await reading;
  const events = [...seen.matchAll(/^data: (.*)$/gm)].map((m) => JSON.parse(m[1] ?? "{}") as { type: string; action: string; subject: string; data: { state: string } });
  const states = events.filter((e) => e.type === "unit" && e.subject === "d2" && (e.action === "added" || e.action === "state")).map((e) => e.data.state);
  assert.deepEqual(states, ["online", "suspect", "offline", "online"]);
});

test("forged, truncated and oversized datagrams change nothing and are counted", async () => {
  const before = (await station.api("GET", "/api/v1/units")).body;
  const socket = dgram.createSocket("udp4");
  const send = (bytes: Buffer): Promise<void> =>
    new Promise((resolve, reject) => socket.send(bytes, station.discovery.port, station.discovery.host, (error) => (error ? reject(error) : resolve())));
  try {
    const forged = Buffer.alloc(120);
    forged.write("IPSD", 0, "latin1"); // right magic, garbage after it: the HMAC cannot match
    forged[4] = 1;
    randomBytes(100).copy(forged, 20);
    await send(forged);
    await send(Buffer.from("IPSD"));
    await send(Buffer.alloc(1300, 7));
    for (let i = 0; i < 50; i++) await send(randomBytes(1 + (i * 23) % 1100));
  } finally {
    socket.close();
  }
  const counted = await waitFor(
    "rejections counted",
    async () => {
      const text = (await station.api("GET", "/metrics")).text;
      const total = [...text.matchAll(/^ipsan_discovery_packets_rejected_total\{reason="([a-z_]+)"\} ([0-9]+)$/gm)].reduce((sum, m) => sum + Number(m[2]), 0);
      return total >= 53 ? text : undefined;
    },
    { timeoutMs: 3_000 },
  );
  assert.match(counted, /^ipsan_discovery_packets_rejected_total\{reason="too_large"\} [1-9]/m);
  assert.match(counted, /^ipsan_discovery_packets_rejected_total\{reason="truncated"\} [1-9]/m);
  assert.deepEqual((await station.api("GET", "/api/v1/units")).body, before, "the pool did not change");
  assert.equal((await station.api("GET", "/api/v1/health")).status, 200);
});
