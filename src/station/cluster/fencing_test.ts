// A leading station cut off from etcd stops leading before its lease can
// expire, so before any other station can be elected (issue 11: "fencing by
// lease, not by hope"). Real processes: a three-member etcd, station A
// reaching etcd only through a TCP proxy the test controls, stations B and C
// reaching the other two members directly. A leads; the proxy starts dropping
// every byte (a partition without resets); A's log line "not leading any
// more" must come before the "elected leader" line of B or C, A's health must
// say it does not lead, and once the proxy passes again A follows the new
// leader. The canary runs the same scenario on a build whose lease check is
// removed and must see A still claiming the lead after another was elected.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { startTcpProxy, type TcpProxy } from "../../testing/tcp_proxy.ts";
import { patchedBuild } from "../../testing/patched_build.ts";
import { clearEtcd, startEtcdStation, stationHealth, until } from "../../testing/stations.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import type { RunningStation } from "../harness.ts";

let etcd: EtcdCluster;

before(async () => {
  etcd = await startEtcdCluster({ members: 3, prefix: "fencing" });
});
after(async () => {
  await etcd?.stop();
});

const health = stationHealth;

/** The time of the first log line of `station` with `message` (the log's ISO timestamp). */
function loggedAt(station: RunningStation, message: string): number | null {
  for (const line of station.stderr().split("\n")) {
    if (line.includes(message)) return Date.parse(line.slice(0, 24));
  }
  return null;
}

interface Outcome {
  /** A's "not leading any more", or null if it never said so. */
  readonly steppedDownAt: number | null;
  readonly electedAt: number;
  readonly aHealth: { leader?: boolean; problem?: string } | null;
  readonly aFollowsAfterHeal: boolean;
}

async function partitionTheLeader(prefix: string, bin?: string, heal = true): Promise<Outcome> {
  const dirs: TempDir = makeTempDir(prefix, memoryTmpBase());
  const proxy: TcpProxy = await startTcpProxy({ targetPort: Number(new URL(etcd.members[0]!.clientUrl).port) });
  const stations: RunningStation[] = [];
  try {
    const start = (name: string, endpoints: string): Promise<RunningStation> => startEtcdStation(dirs, name, endpoints, bin === undefined ? {} : { bin });
    const a = await start("a", proxy.url());
    stations.push(a);
    await until("station A leads", async () => (await health(a))?.leader === true, 15_000);
    const others = [await start("b", etcd.members[1]!.clientUrl), await start("c", etcd.members[2]!.clientUrl)];
    stations.push(...others);
    await until("B and C follow A", async () => {
      const views = await Promise.all(others.map(health));
      return views.every((v) => v?.leader === false && v.leaderUrl === a.url);
    }, 10_000);

    proxy.blackhole();
    const cutAt = Date.now();
    let newLeader: RunningStation | undefined;
    await until("B or C leads", async () => {
      for (const s of others) if ((await health(s))?.leader === true) newLeader = s;
      return newLeader !== undefined;
    }, 20_000);
    const electedAt = loggedAt(newLeader!, "elected leader");
    assert.ok(electedAt !== null, "the new leader logged its election");
    const aHealth = await health(a);
    console.log(`${prefix}: partition at ${new Date(cutAt).toISOString()}; A stepped down at ${String(loggedAt(a, "not leading any more") === null ? "never" : new Date(loggedAt(a, "not leading any more")!).toISOString())}; new leader elected at ${new Date(electedAt).toISOString()}`);
    if (!heal) return { steppedDownAt: loggedAt(a, "not leading any more"), electedAt, aHealth, aFollowsAfterHeal: false };
    await proxy.pass();
    const aFollowsAfterHeal = await until("A follows the new leader", async () => {
      const view = await health(a);
      return view?.leader === false && view.leaderUrl === newLeader!.url;
    }, 20_000).then(() => true, () => false);
    return { steppedDownAt: loggedAt(a, "not leading any more"), electedAt, aHealth, aFollowsAfterHeal };
  } finally {
    for (const station of stations) await station.close().catch(() => undefined);
    await proxy.close();
    dirs.remove();
    await clearEtcd(etcd); // the next scenario starts from an empty etcd
  }
}

test("a leader cut off from etcd stops leading before another station is elected", async () => {
  const outcome = await partitionTheLeader("fencing");
  assert.ok(outcome.steppedDownAt !== null, "A said it stopped leading");
  assert.ok(outcome.steppedDownAt < outcome.electedAt, `A stepped down (${outcome.steppedDownAt}) before the new leader was elected (${outcome.electedAt})`);
  assert.equal(outcome.aHealth?.leader, false, "A's health says it does not lead");
  assert.match(outcome.aHealth?.problem ?? "", /lease/, "and why");
  assert.ok(outcome.aFollowsAfterHeal, "after the partition A follows the new leader");
});

test("canary: without the lease check, the cut-off leader still claims the lead after another is elected", async () => {
  const build = patchedBuild(
    "canary-lease-check",
    [{ file: "dist/station/cluster/node.js", from: "if (this.mono() > this.leaseValidUntil - ttlMs / 3)", to: "if (false)" }],
    undefined,
    { nodeModules: true },
  );
  try {
    const outcome = await partitionTheLeader("fencing-canary", build.ipsanBin, false);
    const caught = outcome.steppedDownAt === null || outcome.steppedDownAt >= outcome.electedAt || outcome.aHealth?.leader !== false;
    assert.ok(caught, "the broken build must let two stations lead at once (else the test above proves nothing)");
  } finally {
    build.remove();
  }
});
