// An acknowledged change is in etcd before its answer leaves (issue 11: the
// same promise as synchronous=FULL on one station). Real processes: a
// single-member etcd, stations A (leading) and B. With etcd frozen (SIGSTOP),
// a change sent to A must not be acknowledged, and every station answers 503
// saying no station leads; A is then killed with -9, etcd
// resumes, B takes over, and every change that was acknowledged, before or
// during the freeze, is there. The canary runs the same on a build whose
// answers do not wait for etcd: A acknowledges the change during the freeze
// (whether the takeover then loses it depends on timing, and is printed). The same for events: an event stream open
// on A during the freeze must not carry the change (the canary's does).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { patchedBuild } from "../../testing/patched_build.ts";
import { clearEtcd, startEtcdStation, stationHealth, until } from "../../testing/stations.ts";
import { makeTempDir, memoryTmpBase } from "../../testing/tmp.ts";
import type { RunningStation } from "../harness.ts";

let etcd: EtcdCluster;

before(async () => {
  etcd = await startEtcdCluster({ members: 1, prefix: "durability" });
});
after(async () => {
  await etcd?.stop();
});

async function leads(station: RunningStation): Promise<boolean> {
  return (await stationHealth(station))?.leader === true;
}

interface Outcome {
  /** The status A answered the change sent while etcd was frozen (0: no answer). */
  readonly duringStatus: number;
  /** What A and B answered a read while etcd was still frozen, after A stopped leading. */
  readonly frozenReads: string[];
  /** Hosts the new leader lists. */
  readonly hosts: string[];
  /** Whether A's event stream, open during the freeze, carried the change etcd never got. */
  readonly streamSawDuring: boolean;
}

async function freezeAndKill(prefix: string, bin?: string): Promise<Outcome> {
  const dirs = makeTempDir(prefix, memoryTmpBase());
  const stations: RunningStation[] = [];
  const member = etcd.members[0]!;
  try {
    const start = async (name: string): Promise<RunningStation> => {
      const station = await startEtcdStation(dirs, name, etcd, bin === undefined ? {} : { bin });
      stations.push(station);
      return station;
    };
    const a = await start("a");
    await until("A leads", () => leads(a), 15_000);
    const b = await start("b");
    const before = await a.api("PUT", "/api/v1/hosts/before-freeze", { address: "127.0.0.5" });
    assert.equal(before.status, 201, before.text);

    // An event stream open on A through the freeze.
    const stream = new AbortController();
    let streamed = "";
    const reading = fetch(`${a.url}/api/v1/events`, { headers: { authorization: `Bearer ${a.token()}` }, signal: stream.signal })
      .then(async (response) => {
        const decoder = new TextDecoder();
        for await (const chunk of response.body ?? []) streamed += decoder.decode(chunk as Uint8Array, { stream: true });
      })
      .catch(() => undefined);
    await until("the event stream is open", async () => streamed.includes("event stream"), 5_000);

    member.pause();
    let duringStatus = 0;
    try {
      duringStatus = (await a.api("PUT", "/api/v1/hosts/during-freeze", { address: "127.0.0.6" })).status;
    } catch {
      duringStatus = 0;
    }
    const frozenReads: string[] = [];
    for (const station of [a, b]) {
      const read = await station.api("GET", "/api/v1/hosts").catch((error: unknown) => ({ status: 0, text: String(error) }));
      frozenReads.push(`${read.status} ${read.text.trim()}`);
    }
    await a.kill9();
    stream.abort();
    await reading;
    member.resume();
    await until("B leads", () => leads(b), 20_000);
    const listed = await b.api("GET", "/api/v1/hosts");
    assert.equal(listed.status, 200, listed.text);
    return { duringStatus, frozenReads, streamSawDuring: streamed.includes("during-freeze"), hosts: (listed.body as { items: { name: string }[] }).items.map((h) => h.name).sort() };
  } finally {
    if (member.paused()) member.resume();
    for (const station of stations) await station.close().catch(() => undefined);
    dirs.remove();
    await clearEtcd(etcd);
  }
}

test("a change is acknowledged only once it is in etcd: none while etcd is frozen, and every acknowledged one survives the leader's kill -9", async () => {
  const outcome = await freezeAndKill("durability");
  assert.ok(outcome.duringStatus < 200 || outcome.duringStatus >= 300, `no acknowledgement while etcd was frozen (got ${outcome.duringStatus})`);
  assert.equal(outcome.duringStatus, 503, "the leader says it could not keep the change (it stopped leading)");
  assert.ok(outcome.hosts.includes("before-freeze"), `the change acknowledged before the freeze survives: ${outcome.hosts.join(" ")}`);
  for (const read of outcome.frozenReads) assert.match(read, /^503 .*no station leads at the moment/, "with etcd frozen, every station answers 503 and says why");
  assert.equal(outcome.streamSawDuring, false, "the event stream never carried the change etcd did not get");
});

test("canary: a build that answers before etcd has the change acknowledges it while etcd is frozen", async () => {
  const build = patchedBuild(
    "canary-durable",
    [
      { file: "dist/station/api/server.js", from: "if (this.cluster !== undefined)\n                    await this.cluster.durable();", to: "" },
      { file: "dist/station/api/system.js", from: "const durable = api.clusterDurable;", to: "const durable = undefined;" },
    ],
    undefined,
    { nodeModules: true },
  );
  try {
    const outcome = await freezeAndKill("durability-canary", build.ipsanBin);
    // The defect the test above catches: an acknowledgement while etcd cannot have the change. Whether the
    // change is then lost depends on timing (the append may still be in the frozen member's socket, and be
    // taken when it resumes, before the dead leader's lease expires), so a loss is reported, not required.
    const acknowledged = outcome.duringStatus >= 200 && outcome.duringStatus < 300;
    const lost = acknowledged && !outcome.hosts.includes("during-freeze");
    console.log(`canary: status ${outcome.duringStatus} while etcd was frozen; the change ${lost ? "was lost" : "survived"} the takeover`);
    assert.ok(acknowledged, `the broken build must acknowledge the change while etcd is frozen (status ${outcome.duringStatus}, hosts ${outcome.hosts.join(" ")})`);
    assert.ok(outcome.streamSawDuring, "and its event stream must show the change before etcd had it");
  } finally {
    build.remove();
  }
});
