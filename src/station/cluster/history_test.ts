// A randomized run of several stations on etcd (issue 11 "Proof"), checked by
// the history checker (src/testing/history.ts): three clients allocate,
// release, assign freed volumes by hand and list assignments through random
// stations, recording every request and answer; meanwhile a chaos loop kills
// a station with -9 (the leader half the time) and restarts it, or kills an
// etcd member with -9 and restarts it. At the end the leader's list of every
// assignment is the final state. No acknowledged write lost, no volume held
// twice, retries of one request id answered with one assignment, reads never
// going back in time on one station. The seed is printed (IPSAN_HISTORY_SEED
// repeats a run's choices; timing still differs).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { assertHistory, type AssignmentView, type FinalAssignment, type HistoryOp } from "../../testing/history.ts";
import { freeUdpPort } from "../../testing/daemon.ts";
import { sleep } from "../../testing/process.ts";
import { startEtcdStation, startUnitOfStations, stationHealth, until } from "../../testing/stations.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import type { RunningUnit } from "../../testing/unit.ts";
import { seededRandom, type Random } from "../../util/random.ts";
import type { RunningStation } from "../harness.ts";
import type { Assignment } from "../pool_harness.ts";

const RUN_MS = 30_000;
const CHAOS_EVERY_MS = 5_000;
const CLIENTS = 3;
const SEED = Number(process.env["IPSAN_HISTORY_SEED"] ?? Math.floor(Math.random() * 2 ** 31));

let etcd: EtcdCluster;
let dirs: TempDir;
const slots: { name: string; discovery: string; station: RunningStation | null }[] = [];
const units: RunningUnit[] = [];

async function startSlot(i: number): Promise<RunningStation> {
  const slot = slots[i]!;
  const station = await startEtcdStation(dirs, slot.name, etcd, { discovery: slot.discovery, extraArgs: ["--leader-lease", "2s", "--reconcile-interval-ms", "500"] });
  slot.station = station;
  return station;
}

async function isLeader(station: RunningStation | null): Promise<boolean> {
  return (await stationHealth(station))?.leader === true;
}

before(async () => {
  etcd = await startEtcdCluster({ members: 3, prefix: "history" });
  dirs = makeTempDir("history", memoryTmpBase());
  for (let i = 0; i < 3; i++) slots.push({ name: `s${i}`, discovery: `127.0.0.1:${await freeUdpPort()}`, station: null });
  for (let i = 0; i < 3; i++) await startSlot(i);
  await until("a leader", async () => (await Promise.all(slots.map((s) => isLeader(s.station)))).includes(true), 20_000);
  for (const name of ["ha", "hb"]) units.push(await startUnitOfStations(name, slots.map((s) => s.discovery), slots[0]!.station!));
  await until(
    "both units online",
    async () => {
      try {
        const response = await slots[0]!.station!.api("GET", "/api/v1/units");
        return ((response.body as { items?: { state: string }[] }).items ?? []).filter((u) => u.state === "online").length === 2;
      } catch {
        return false;
      }
    },
    20_000,
  );
});

after(async () => {
  for (const unit of units) await unit.close().catch(() => undefined);
  for (const slot of slots) await slot.station?.close().catch(() => undefined);
  await etcd?.stop();
  dirs?.remove();
});

function view(a: Assignment): AssignmentView {
  return { assignmentId: a.id, unit: a.unit, volume: a.volume, state: a.state, ...(a.requestId === null ? {} : { requestId: a.requestId }) };
}

test("randomized allocations, releases, assigns and reads through kills of stations and etcd members keep every promise", async () => {
  console.log(`history seed ${SEED} (IPSAN_HISTORY_SEED=${SEED} repeats the choices)`);
  const random: Random = seededRandom(SEED);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
  const history: HistoryOp[] = [];
  const began = Date.now();
  const running = (): boolean => Date.now() - began < RUN_MS;
  const live = (): RunningStation[] => slots.map((s) => s.station).filter((s): s is RunningStation => s !== null && s.running());
  const chaos: string[] = [];
  /** Answers by kind and status ("0": no answer), printed: what the clients met. */
  const statuses = new Map<string, number>();

  /** One request to one station, recorded. */
  async function call(client: string, station: RunningStation, op: Omit<HistoryOp, "client" | "station" | "startMs" | "endMs" | "outcome">, method: string, path: string, body?: unknown) {
    const startMs = Date.now();
    let status = 0;
    let answer: unknown;
    try {
      const response = await station.api(method, path, body);
      status = response.status;
      answer = response.body;
    } catch {
      status = 0;
    }
    const endMs = Date.now();
    statuses.set(`${op.kind} ${status}`, (statuses.get(`${op.kind} ${status}`) ?? 0) + 1);
    const okStatus = op.kind === "release" ? status === 204 || status === 202 : status === 200 || status === 201;
    // Refusals that changed nothing: a 4xx (but 409 to a retried allocation: its first attempt may still be running), 507 (no unit can hold it).
    const definite = (status >= 400 && status < 500 && (status !== 409 || op.kind !== "allocate")) || status === 507;
    const outcome = okStatus ? "ok" : definite ? "failed" : "unknown";
    const record: HistoryOp = {
      client,
      station: station.url,
      startMs,
      endMs,
      outcome,
      ...op,
      ...(outcome === "ok" && (op.kind === "allocate" || op.kind === "assign") ? { answer: view(answer as Assignment) } : {}),
      ...(outcome === "ok" && op.kind === "read" ? { seen: ((answer as { items: Assignment[] }).items ?? []).map(view) } : {}),
    };
    history.push(record);
    return { status, answer, outcome };
  }

  const client = async (c: number): Promise<void> => {
    const name = `c${c}`;
    const mine: Assignment[] = [];
    const freed: { unit: string; volume: string }[] = [];
    for (let n = 0; running(); n++) {
      const stations = live();
      if (stations.length === 0) {
        await sleep(100);
        continue;
      }
      const roll = random();
      if (roll < 0.35 || mine.length === 0) {
        // Allocate, retrying the same request id on other stations until answered or refused.
        const requestId = `${name}-${n}`;
        for (let attempt = 0; attempt < 40 && running(); attempt++) {
          const result = await call(name, pick(live()), { kind: "allocate", requestId }, "POST", "/api/v1/allocations", { requestId, host: `${name}-host`, sizeBytes: "4M", address: "127.0.0.2" });
          if (result.outcome === "ok") {
            mine.push(result.answer as Assignment);
            break;
          }
          if (result.outcome === "failed") break;
          await sleep(150);
        }
      } else if (roll < 0.45 && freed.length > 0) {
        const target = freed.shift()!;
        const requestId = `${name}-assign-${n}`;
        const result = await call(name, pick(stations), { kind: "assign", requestId }, "POST", "/api/v1/assignments", { requestId, host: `${name}-host`, unit: target.unit, volume: target.volume });
        if (result.outcome === "ok") mine.push(result.answer as Assignment);
      } else if (roll < 0.75) {
        const victim = mine.splice(Math.floor(random() * mine.length), 1)[0]!;
        const result = await call(name, pick(stations), { kind: "release", assignmentId: victim.id }, "DELETE", `/api/v1/assignments/${victim.id}`);
        if (result.outcome === "ok") freed.push({ unit: victim.unit, volume: victim.volume });
        else if (result.outcome !== "failed") mine.push(victim);
      } else {
        await call(name, pick(stations), { kind: "read" }, "GET", "/api/v1/assignments");
      }
    }
  };

  let step = 0;
  const chaosLoop = async (): Promise<void> => {
    while (Date.now() - began < RUN_MS - CHAOS_EVERY_MS) {
      await sleep(CHAOS_EVERY_MS * (0.6 + 0.8 * random()));
      // The kinds of failure in turn (the victim is random within its kind): the leading station,
      // an etcd member, any station, etcd's leader member.
      const kind = step++ % 4;
      if (kind === 0 || kind === 2) {
        let index = Math.floor(random() * slots.length);
        if (kind === 0) {
          for (let i = 0; i < slots.length; i++) if (await isLeader(slots[i]!.station)) index = i;
        }
        const slot = slots[index]!;
        const wasLeader = await isLeader(slot.station);
        chaos.push(`+${Date.now() - began} ms kill -9 station ${slot.name}${wasLeader ? " (leader)" : ""}`);
        await slot.station?.kill9();
        slot.station = null;
        await sleep(1_000 + 2_000 * random());
        await startSlot(index);
        chaos.push(`+${Date.now() - began} ms station ${slot.name} back`);
      } else {
        const member = kind === 3 ? await etcd.leader().catch(() => pick(etcd.members)) : pick(etcd.members);
        chaos.push(`+${Date.now() - began} ms kill -9 etcd member ${member.name}${kind === 3 ? " (etcd's leader)" : ""}`);
        await member.kill("SIGKILL");
        await sleep(1_000 + 2_000 * random());
        await member.start();
        chaos.push(`+${Date.now() - began} ms etcd member ${member.name} back`);
      }
    }
  };

  await Promise.all([...Array.from({ length: CLIENTS }, (_v, c) => client(c)), chaosLoop()]);
  let final: FinalAssignment[] = [];
  await until(
    "a leader lists every assignment",
    async () => {
      for (const station of live()) {
        if (!(await isLeader(station))) continue;
        const response = await station.api("GET", "/api/v1/assignments?all=true&limit=10000");
        if (response.status !== 200) return false;
        final = (response.body as { items: Assignment[] }).items.map((a) => ({ ...view(a), state: a.state }));
        return true;
      }
      return false;
    },
    20_000,
  );
  const report = assertHistory(history, final);
  console.log(`history seed ${SEED}: ${history.length} requests ${JSON.stringify(report.counts)}; answers ${JSON.stringify(Object.fromEntries([...statuses].sort()))}; chaos: ${chaos.join("; ")}`);
  const acknowledged = history.filter((op) => op.kind === "allocate" && op.outcome === "ok").length;
  assert.ok(acknowledged >= 10, `the run made progress (${acknowledged} acknowledged allocations)`);
  assert.ok(chaos.some((c) => c.includes("(leader)")) && chaos.some((c) => c.includes("etcd member")), `the run killed the leading station and an etcd member: ${chaos.join("; ")}`);
});
