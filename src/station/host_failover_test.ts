// Host failover (issue 6 section 4, docs/adr/0010) with a real station and
// three real `ipsan unit`s joined over discovery; hosts are loopback
// addresses (127.0.0.x) that the test speaks as (heartbeats over the API, NBD
// connections bound to the host's address):
// - the decision (pure, injected times): which host failed (silence counted
//   from the station's start at the earliest) and which spare takes over;
// - a silent host's mirror and single copy move to the online spare within
//   --host-failover-after plus a little: events failover-started (host), then
//   failover-fenced before failover-moved (each assignment); the old host's
//   open NBD connection is closed by the unit at once (it never sent another
//   request), its new opens are refused and counted (GET /v1/info refused),
//   and every unit grants the spare and only the spare;
// - a unit that does not answer (SIGSTOP) blocks the move: failover-waiting,
//   the old host already fenced on the unit that answered, and the spare
//   granted NOWHERE while it waits; SIGCONT: the move finishes;
// - no spare online: failover-waiting, nothing moves; --host-failover-after is
//   validated (a bare number is refused);
// - canaries: a station that grants the spare during the move (before every
//   unit confirmed the fence), or that finishes the move without every
//   unit's confirmation, fails the blocked-move check.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { NbdClient, parseNbdUri, type NbdTarget } from "../nbd/client.ts";
import { controlOk } from "../testing/control.ts";
import { run, waitFor } from "../testing/process.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { IPSAN_BIN, REPO_ROOT, type RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { chooseSpare, failedHosts } from "./host_failover.ts";
import { heldVolumes, startJoinedUnit, unitVolume, type Assignment } from "./pool_harness.ts";
import type { AssignmentRecord, HostRecord } from "./types.ts";
import { UNIT_CALL_TIMEOUT_MS } from "./unit_client.ts";

/** The NBD target of `uri`, connected from `address` (the test speaks as that host). */
const from = (address: string, uri: string): NbdTarget => ({ ...parseNbdUri(uri), localAddress: address });

const FAILOVER_AFTER_MS = 2_000;
const H1 = "127.0.0.2";
const SPARE = "127.0.0.3";
const H3 = "127.0.0.4";
const H4 = "127.0.0.5";
const H6 = "127.0.0.7";

const FAILOVER_ARGS = ["--host-failover-after", "2s", "--host-offline-after-ms", "1500", "--reconcile-interval-ms", "500", "--pending-deadline-ms", "5000"];

type Moved = Assignment & { movedFrom: string | null; movedAt: string | null };

/** A station with --host-failover-after 2s and units joined to it; the hosts in `beating` heartbeat like agents (every 300 ms). */
class Pool {
  readonly beating = new Set<string>();
  readonly #timer: NodeJS.Timeout;
  /** Replaced by restart(). */
  station: RunningStation;
  readonly units: RunningUnit[];
  readonly #old: RunningStation[] = [];

  private constructor(station: RunningStation, units: RunningUnit[]) {
    this.station = station;
    this.units = units;
    this.#timer = setInterval(() => {
      for (const host of this.beating) void this.station.api("POST", `/api/v1/hosts/${host}/heartbeat`, {}).catch(() => undefined);
    }, 300);
  }

  /** kill -9 of the station, then a new one on the same data and discovery address (the units find it again). */
  async restart(): Promise<void> {
    const old = this.station;
    await old.kill9();
    this.#old.push(old);
    this.station = await startStation({
      dataDir: old.dataDir,
      keepData: true,
      discovery: `${old.discovery.host}:${old.discovery.port}`,
      extraArgs: FAILOVER_ARGS,
    });
  }

  /** `bin`: another bin/ipsan for the station (a canary's patched build). */
  static async start(unitNames: readonly string[], bin?: string): Promise<Pool> {
    const station = await startStation({ extraArgs: FAILOVER_ARGS, ...(bin === undefined ? {} : { bin }) });
    const units = await Promise.all(unitNames.map((name) => startJoinedUnit(station, { name, capacity: "128M" })));
    return new Pool(station, units);
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    for (const unit of this.units) if (unit.pid > 0) process.kill(unit.pid, "SIGCONT");
    await Promise.all(this.units.map((u) => u.close()));
    await this.station.close();
    for (const old of this.#old) await old.close();
  }

  unit(name: string): RunningUnit {
    const unit = this.units.find((u) => u.name === name);
    if (unit === undefined) throw new Error(`no unit ${name}`);
    return unit;
  }

  async register(host: string, address: string, spare: boolean): Promise<void> {
    const put = await this.station.api("PUT", `/api/v1/hosts/${host}`, { address, spare });
    assert.ok(put.status === 200 || put.status === 201, put.text);
    assert.equal((put.body as { spare?: boolean }).spare, spare);
    this.beating.add(host);
  }

  async allocate(host: string, address: string, copies: number, requestId: string): Promise<Assignment> {
    const response = await this.station.api("POST", "/api/v1/allocations", { requestId, host, sizeBytes: "8M", address, copies });
    assert.equal(response.status, 201, response.text);
    return response.body as Assignment;
  }

  async assignment(id: string): Promise<Moved> {
    const response = await this.station.api("GET", `/api/v1/assignments/${id}`);
    assert.equal(response.status, 200, response.text);
    return response.body as Moved;
  }
}

let pool: Pool;
let station: RunningStation;

before(async () => {
  pool = await Pool.start(["f1", "f2", "f3"]);
  station = pool.station;
  await collectEvents();
});
after(async () => {
  streamAbort.abort();
  await pool?.close();
});

const unitNamed = (name: string): RunningUnit => pool.unit(name);
const register = (host: string, address: string, spare: boolean): Promise<void> => pool.register(host, address, spare);
const allocate = (host: string, address: string, copies: number, requestId: string): Promise<Assignment> => pool.allocate(host, address, copies, requestId);
const assignment = (id: string): Promise<Moved> => pool.assignment(id);
// `station` is the first station (the event collector's); the restart test, last, replaces pool.station.

interface Event {
  seq: number;
  at: string;
  type: string;
  action: string;
  subject: string;
  data: Record<string, unknown>;
}
/** Every event the station publishes while the tests run (one SSE subscription from the start). */
const seen: Event[] = [];
const streamAbort = new AbortController();

async function collectEvents(): Promise<void> {
  const response = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${station.token()}` }, signal: streamAbort.signal });
  const reader = response.body?.getReader();
  let partial = "";
  void (async () => {
    try {
      for (;;) {
        const next = await reader?.read();
        if (next === undefined || next.done) return;
        partial += Buffer.from(next.value).toString("utf8");
        let cut: number;
        while ((cut = partial.indexOf("\n")) >= 0) {
          const line = partial.slice(0, cut);
          partial = partial.slice(cut + 1);
          if (line.startsWith("data: ")) seen.push(JSON.parse(line.slice(6)) as Event);
        }
      }
    } catch {
      // aborted at the end
    }
  })();
}

/** Waits (bounded) until an event after `since` matches; returns every event after `since`. */
async function events(since: number, match: (e: Event) => boolean, timeoutMs = 10_000): Promise<Event[]> {
  const found = await waitFor(
    "an event",
    () => (seen.some((e) => e.seq > since && match(e)) ? true : undefined),
    { timeoutMs, intervalMs: 50 },
  ).catch(() => false);
  const after = seen.filter((e) => e.seq > since);
  assert.ok(found, `no matching event within ${timeoutMs} ms; saw ${JSON.stringify(after.map((e) => `${e.action}:${e.subject}`))}`);
  return after;
}

function lastSeq(): number {
  return seen.at(-1)?.seq ?? 0;
}

async function refused(unit: RunningUnit): Promise<{ connections: number; opens: number }> {
  return ((await controlOk(unit, "GET", "/v1/info")) as { refused: { connections: number; opens: number } }).refused;
}

const host = (name: string, address: string, lastSeenAtMs: number, spare = false): HostRecord => ({ name, address, lastSeenAtMs, createdAtMs: 0, spare });
const live = (id: string, onHost: string, extra: Partial<AssignmentRecord> = {}): AssignmentRecord =>
  ({ id, host: onHost, state: "active", movedFrom: null, movedAtMs: null, legs: [], ...extra }) as AssignmentRecord;

test("the decision: silence counted from the station's start; a spare online on another address, the least loaded", () => {
  const hosts = [host("a", "10.0.0.1", 1_000), host("b", "10.0.0.2", 9_000), host("s1", "10.0.0.3", 9_500, true), host("s2", "10.0.0.4", 9_500, true)];
  const assignments = [live("x", "a"), live("y", "b"), live("z", "s1")];
  // Started at 0: a (silent 9 s) has failed with a 5 s limit, b (1 s) has not.
  assert.deepEqual(failedHosts(hosts, assignments, 10_000, 0, 5_000).map((h) => h.name), ["a"]);
  // A station started at 8 s has not waited 5 s for anyone yet (heartbeats are memory only).
  assert.deepEqual(failedHosts(hosts, assignments, 10_000, 8_000, 5_000), []);
  // A host without active assignments, or whose assignment is already being moved, is not failed over.
  assert.deepEqual(failedHosts(hosts, [live("x", "a", { movedFrom: "q", movedAtMs: null }), live("w", "a", { state: "revoking" })], 10_000, 0, 5_000), []);
  const failed = hosts[0] as HostRecord;
  const choice = chooseSpare(failed, hosts, assignments, 10_000, 1_500);
  assert.ok("spare" in choice && choice.spare.name === "s2", "s2 holds nothing, s1 one assignment");
  // A spare silent for longer than the online window is not chosen; one on the failed host's address never.
  assert.ok("reason" in chooseSpare(failed, [failed, host("s3", "10.0.0.5", 5_000, true)], [], 10_000, 1_500));
  const same = chooseSpare(failed, [failed, host("s4", "10.0.0.1", 10_000, true)], [], 10_000, 1_500);
  assert.ok("reason" in same && /another address/.test(same.reason), JSON.stringify(same));
  // iSCSI assignments need a spare with an initiator name (the grant names it): s5 has none, s6 has one.
  const s5 = host("s5", "10.0.0.5", 10_000, true);
  const noIqn = chooseSpare(failed, [failed, s5], [], 10_000, 1_500, true);
  assert.ok("reason" in noIqn && /no spare host online with an iSCSI initiator name \(IQN\) for a's iSCSI assignments.*--spare --iqn IQN/.test(noIqn.reason), JSON.stringify(noIqn));
  assert.ok("spare" in chooseSpare(failed, [failed, s5], [], 10_000, 1_500, false), "NBD assignments need no IQN");
  const withIqn = chooseSpare(failed, [failed, s5, { ...host("s6", "10.0.0.6", 10_000, true), iqn: "iqn.1994-05.com.redhat:s6" }], [live("q", "s6")], 10_000, 1_500, true);
  assert.ok("spare" in withIqn && withIqn.spare.name === "s6", JSON.stringify(withIqn));
});

test("--host-failover-after takes a DURATION; a bare number is refused", async () => {
  const bad = await run(process.execPath, [IPSAN_BIN, "station", "--data", "/nonexistent-ipsan", "--host-failover-after", "60"], { timeoutMs: 15_000 });
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /--host-failover-after: invalid duration "60"/);
});

test("PUT /api/v1/hosts/NAME: spare must be a boolean (400 naming it); omitted (or null, as every field), it is kept", async () => {
  for (const spare of ["yes", 1, "true", [true]]) {
    const bad = await station.api("PUT", "/api/v1/hosts/hs-bad", { address: "127.0.0.9", spare });
    assert.equal(bad.status, 400, bad.text);
    assert.equal((bad.body as { error: { field: string } }).error.field, "spare");
  }
  assert.equal((await station.api("GET", "/api/v1/hosts/hs-bad")).status, 404, "nothing recorded");
  assert.equal((await station.api("PUT", "/api/v1/hosts/hs-keep", { address: "127.0.0.9", spare: true })).status, 201);
  const kept = await station.api("PUT", "/api/v1/hosts/hs-keep", { address: "127.0.0.9" });
  assert.equal((kept.body as { spare: boolean }).spare, true, "an update without spare keeps it");
  const nulled = await station.api("PUT", "/api/v1/hosts/hs-keep", { address: "127.0.0.9", spare: null });
  assert.equal((nulled.body as { spare: boolean }).spare, true, "null is absent, as for every field");
  const listed = (await station.api("GET", "/api/v1/hosts")).body as { items: { name: string; spare: boolean }[] };
  assert.equal(listed.items.find((h) => h.name === "hs-keep")?.spare, true);
});

test("a silent host's assignments move to the spare: fenced on every unit first (open connection closed at once), then the spare granted", async () => {
  await register("spare", SPARE, true);
  await register("h1", H1, false);
  const mirror = await allocate("h1", H1, 2, "hf-mirror");
  const single = await allocate("h1", H1, 1, "hf-single");
  // h1 is using its single copy: an open NBD connection from its address, idle (as if paused).
  const singleUnit = unitNamed(single.unit);
  const conn = await NbdClient.connect(from(H1, singleUnit.uri(single.volume)), { requestTimeoutMs: 3_000 });
  await conn.write(0, Buffer.alloc(4096, 0x11), true);
  let closedAtMs: number | undefined;
  conn.onBroken(() => (closedAtMs ??= Date.now()));
  const since = lastSeq();
  const before = await refused(singleUnit);
  const silentFromMs = Date.now();
  pool.beating.delete("h1");

  const moved = await waitFor(
    "both assignments moved to the spare",
    async () => {
      const list = await Promise.all([assignment(mirror.id), assignment(single.id)]);
      return list.every((a) => a.host === "spare" && a.movedAt !== null) ? list : undefined;
    },
    { timeoutMs: FAILOVER_AFTER_MS + 10_000, intervalMs: 100 },
  );
  const tookMs = Date.now() - silentFromMs;
  assert.ok(tookMs >= FAILOVER_AFTER_MS, `not before --host-failover-after (${tookMs} ms)`);
  for (const a of moved) {
    assert.equal(a.movedFrom, "h1");
    assert.equal(a.hostAddress, SPARE);
    assert.equal(a.state, "active");
  }

  // Events: started (host), then per assignment fenced strictly before moved.
  const list = await events(since, (e) => e.action === "failover-moved" && e.subject === single.id);
  await events(since, (e) => e.action === "failover-moved" && e.subject === mirror.id);
  const started = list.find((e) => e.action === "failover-started");
  assert.ok(started !== undefined && started.type === "host" && started.subject === "h1" && started.data["spare"] === "spare", JSON.stringify(list));
  for (const id of [mirror.id, single.id]) {
    const fenced = list.find((e) => e.action === "failover-fenced" && e.subject === id);
    const done = list.find((e) => e.action === "failover-moved" && e.subject === id);
    assert.ok(fenced !== undefined && done !== undefined, `fenced and moved events of ${id}: ${JSON.stringify(list.map((e) => `${e.action}:${e.subject}`))}`);
    assert.ok(started.seq < fenced.seq && fenced.seq < done.seq, "started < fenced < moved");
  }

  // The unit closed h1's idle connection at once (no request of h1's made it notice): before the fence was confirmed.
  assert.ok(closedAtMs !== undefined, "the old host's open connection was closed by the unit");
  const fencedAt = Date.parse(list.find((e) => e.action === "failover-fenced" && e.subject === single.id)?.at ?? "");
  assert.ok(closedAtMs <= fencedAt + 500, `closed at once: ${closedAtMs - fencedAt} ms after the fence was confirmed`);
  await assert.rejects(conn.write(0, Buffer.alloc(4096, 0x22), true), "the old connection takes no write");
  await conn.close().catch(() => undefined);
  // h1 comes back and tries again: refused, and counted.
  await assert.rejects(NbdClient.connect(from(H1, singleUnit.uri(single.volume)), { connectTimeoutMs: 3_000 }));
  const after = await refused(singleUnit);
  assert.ok(after.opens + after.connections > before.opens + before.connections, `refusals counted: ${JSON.stringify({ before, after })}`);
  // The spare writes; every unit grants the spare and only the spare.
  const spareConn = await NbdClient.connect(from(SPARE, singleUnit.uri(single.volume)));
  await spareConn.write(0, Buffer.alloc(4096, 0x33), true);
  await spareConn.close();
  for (const a of moved) {
    for (const held of heldVolumes(a)) assert.deepEqual((await unitVolume(unitNamed(held.unit), held.volume)).grants, [SPARE], `${held.unit}/${held.volume}`);
  }
});

/**
 * h (on `address`) holds a mirror over two units; one unit is frozen (SIGSTOP)
 * and h falls silent. The move starts (movedFrom set), and for longer than
 * the station's unit call timeout: the answering unit has fenced h and grants
 * NOBODY, the spare is granted nowhere, the move is not finished. Then the
 * frozen unit wakes: the move finishes and both units grant the spare only.
 */
async function blockedMove(p: Pool, host: string, address: string, spareAddress: string): Promise<string> {
  await p.register(host, address, false);
  const mirror = await p.allocate(host, address, 2, `hf-blocked-${host}`);
  const legs = heldVolumes(mirror);
  const stopped = p.unit(legs[1]?.unit ?? "");
  const answering = p.unit(legs[0]?.unit ?? "");
  process.kill(stopped.pid, "SIGSTOP");
  try {
    p.beating.delete(host);
    await waitFor(
      "the move started",
      async () => ((await p.assignment(mirror.id)).movedFrom === host ? true : undefined),
      { timeoutMs: FAILOVER_AFTER_MS + 10_000, intervalMs: 100 },
    );
    // Until the station has given up on the frozen unit's answer (it logs failover-waiting after the
    // unit call timeout, 5 s) and a little more; bounded for a station that never waits.
    const deadline = Date.now() + 3 * UNIT_CALL_TIMEOUT_MS;
    let waitingSeenAt: number | undefined;
    let fenced = false;
    while (Date.now() < deadline && (waitingSeenAt === undefined || Date.now() < waitingSeenAt + 1_500)) {
      if (waitingSeenAt === undefined && p.station.stderr().includes(`host failover waiting key=${mirror.id}`)) waitingSeenAt = Date.now();
      const grants = (await unitVolume(answering, legs[0]?.volume ?? "")).grants;
      assert.ok(!grants.includes(spareAddress), `the spare must not be granted while a unit has not confirmed the fence: ${answering.name} grants ${JSON.stringify(grants)}`);
      if (grants.length === 0) fenced = true;
      else assert.ok(!fenced, `fenced once, never granted again: ${JSON.stringify(grants)}`);
      const now = await p.assignment(mirror.id);
      assert.equal(now.movedAt, null, "the move is not finished while a unit has not confirmed");
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.ok(fenced, `the unit that answers fenced ${host} at once`);
    assert.ok(waitingSeenAt !== undefined, "the station logged that the move waits for the frozen unit");
  } finally {
    process.kill(stopped.pid, "SIGCONT");
  }
  const done = await waitFor(
    "the move finished once the unit answers",
    async () => {
      const a = await p.assignment(mirror.id);
      return a.movedAt !== null ? a : undefined;
    },
    { timeoutMs: 20_000, intervalMs: 200 },
  );
  assert.equal(done.host, "spare");
  for (const held of heldVolumes(done)) {
    await waitFor(
      `${held.unit}/${held.volume} grants the spare only`,
      async () => {
        const grants = (await unitVolume(p.unit(held.unit), held.volume)).grants;
        return JSON.stringify(grants) === JSON.stringify([spareAddress]) ? true : undefined;
      },
      { timeoutMs: 10_000, intervalMs: 200 },
    );
  }
  return mirror.id;
}

test("a unit that does not answer blocks the move: the spare is granted nowhere until every unit confirmed the old host is fenced", async () => {
  const since = lastSeq();
  const id = await blockedMove(pool, "h3", H3, SPARE);
  const list = await events(since, (e) => e.action === "failover-moved" && e.subject === id);
  const waiting = list.find((e) => e.action === "failover-waiting" && e.data["assignment"] === id);
  assert.ok(waiting !== undefined && waiting.type === "host" && waiting.subject === "h3", JSON.stringify(list.map((e) => `${e.action}:${e.subject}`)));
  assert.match(String(waiting.data["reason"]), /did not confirm/);
});

for (const canary of [
  {
    what: "grants the spare before the old host is fenced everywhere (desiredGrants counts a move in progress)",
    edit: { file: "dist/station/assignments/grants.js", from: "                if (isFencing(a))\n                    continue;\n", to: "" },
  },
  {
    what: "finishes the move without every unit's confirmation",
    edit: { file: "dist/station/host_failover.js", from: "if (blocked.length > 0) {", to: "if (false) {" },
  },
]) {
  test(`canary: a station that ${canary.what} fails the blocked-move check`, async () => {
    const build = patchedBuild("canary-failover", [canary.edit], REPO_ROOT, { nodeModules: true });
    let canaryPool: Pool | undefined;
    try {
      canaryPool = await Pool.start(["c1", "c2"], build.ipsanBin);
      await canaryPool.register("spare", SPARE, true);
      await assert.rejects(blockedMove(canaryPool, "hc", H1, SPARE), (error: Error) => {
        assert.match(error.message, /must not be granted|not finished/, `the canary fails at the fencing check: ${error.message}`);
        return true;
      });
    } finally {
      await canaryPool?.close();
      build.remove();
    }
  });
}

test("no spare online: failover-waiting, nothing moves", async () => {
  pool.beating.delete("spare");
  await register("h4", H4, false);
  const single = await allocate("h4", H4, 1, "hf-nospare");
  await waitFor("the spare offline", async () => {
    const h = await station.api("GET", "/api/v1/hosts/spare");
    return (h.body as { state: string }).state === "offline" ? true : undefined;
  }, { timeoutMs: 10_000, intervalMs: 200 });
  const since = lastSeq();
  pool.beating.delete("h4");
  const list = await events(since, (e) => e.action === "failover-waiting" && e.subject === "h4", FAILOVER_AFTER_MS + 10_000);
  assert.match(JSON.stringify(list.find((e) => e.action === "failover-waiting")?.data), /no spare host online/);
  const now = await assignment(single.id);
  assert.equal(now.host, "h4");
  assert.equal(now.movedFrom, null);
  assert.deepEqual((await unitVolume(unitNamed(single.unit), single.volume)).grants, [H4], "the silent host keeps its grant when nobody can take over");
});

test("a station killed during a move resumes it after its restart: fenced again, then the spare granted", async () => {
  await register("h6", H6, false);
  const mirror = await allocate("h6", H6, 2, "hf-restart");
  const legs = heldVolumes(mirror);
  const stopped = unitNamed(legs[1]?.unit ?? "");
  pool.beating.add("spare");
  process.kill(stopped.pid, "SIGSTOP");
  try {
    pool.beating.delete("h6");
    await waitFor(
      "the move started",
      async () => ((await assignment(mirror.id)).movedFrom === "h6" ? true : undefined),
      { timeoutMs: FAILOVER_AFTER_MS + 10_000, intervalMs: 100 },
    );
    await pool.restart();
    const resumed = await assignment(mirror.id);
    assert.equal(resumed.movedAt, null, "still fencing after the restart (the frozen unit never confirmed)");
    assert.equal(resumed.host, "spare");
  } finally {
    process.kill(stopped.pid, "SIGCONT");
  }
  const done = await waitFor(
    "the restarted station finishes the move",
    async () => {
      const a = await assignment(mirror.id);
      return a.movedAt !== null ? a : undefined;
    },
    { timeoutMs: 30_000, intervalMs: 200 },
  );
  assert.equal(done.movedFrom, "h6");
  for (const held of heldVolumes(done)) {
    await waitFor(
      `${held.unit}/${held.volume} grants the spare only`,
      async () => {
        const grants = (await unitVolume(unitNamed(held.unit), held.volume)).grants;
        return JSON.stringify(grants) === JSON.stringify([SPARE]) ? true : undefined;
      },
      { timeoutMs: 10_000, intervalMs: 200 },
    );
  }
});
