// The etcd test harness (src/testing/etcd.ts) against real Debian etcd 3.4
// processes and the etcd3 client the station uses: a three-member cluster
// serves every endpoint, survives kill -9 of its leader (new leader, still
// writable, the member restarts with its data dir and catches up), elects a
// new leader when the leader is SIGSTOPped, and a client behind the test's
// TCP proxy times out in a blackhole and works again after pass().
// Measured figures are printed as `etcd harness: ...` lines.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { Etcd3 } from "etcd3";
import { type EtcdCluster, type EtcdMember, etcdctl, startEtcdCluster } from "./etcd.ts";
import { waitFor } from "./process.ts";
import { type TcpProxy, startTcpProxy } from "./tcp_proxy.ts";

const CALL_DEADLINE_MS = 3_000;
const LEADER_TIMEOUT_MS = 5_000;

function client(hosts: string | string[]): Etcd3 {
  return new Etcd3({ hosts, dialTimeout: CALL_DEADLINE_MS, defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + CALL_DEADLINE_MS }) });
}

function note(line: string): void {
  process.stdout.write(`etcd harness: ${line}\n`);
}

describe("etcd test cluster (3 members)", () => {
  let cluster: EtcdCluster;
  const clients: Etcd3[] = [];
  const proxies: TcpProxy[] = [];
  const open = (hosts: string | string[]): Etcd3 => {
    const c = client(hosts);
    clients.push(c);
    return c;
  };

  before(async () => {
    const startMs = Date.now();
    cluster = await startEtcdCluster({ members: 3, prefix: "etcd-test" });
    note(`3 members healthy ${Date.now() - startMs} ms after spawn`);
  });
  after(async () => {
    for (const c of clients) c.close();
    for (const p of proxies) await p.close();
    const dir = cluster.dir;
    await cluster.stop();
    assert.equal(existsSync(dir), process.env["IPSAN_KEEP_TMP"] === "1", "stop() removes the cluster's temp dir");
  });

  it("serves puts and gets through every endpoint, and etcdctl sees them", async () => {
    assert.equal(cluster.endpoints.length, 3);
    assert.equal(cluster.endpointsFlag, cluster.endpoints.join(","));
    for (const url of cluster.endpoints) assert.match(url, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.ok(!cluster.endpoints.some((url) => /:(2379|2380)$/.test(url)), "never etcd's default ports");
    for (const [i, member] of cluster.members.entries()) await open(member.clientUrl).put(`k${i}`).value(`v${i}`);
    for (const member of cluster.members) {
      const c = open(member.clientUrl);
      for (let i = 0; i < 3; i++) assert.equal(await c.get(`k${i}`).string(), `v${i}`, `k${i} through ${member.name}`);
    }
    assert.equal(await etcdctl(cluster.endpoints, "get", "k1", "--print-value-only"), "v1\n");
  });

  it("stays writable after kill -9 of its leader, and the member comes back with its data dir", async () => {
    const leader = await cluster.leader(LEADER_TIMEOUT_MS);
    const killedPid = leader.pid;
    const killMs = Date.now();
    await leader.kill("SIGKILL");
    assert.equal(leader.running(), false);
    assert.equal(leader.pid, -1);
    const next = await cluster.leader(LEADER_TIMEOUT_MS);
    note(`new leader ${Date.now() - killMs} ms after kill -9 of the leader`);
    assert.notEqual(next.name, leader.name);
    const all = open(cluster.endpoints);
    await all.put("after-kill").value("written");
    assert.equal(await open(next.clientUrl).get("after-kill").string(), "written");

    // Restart with the same data dir and ports; a stray ETCD_* variable in the test's environment is not passed on.
    process.env["ETCD_NAME"] = "not-this-member";
    const restartMs = Date.now();
    try {
      await leader.start();
    } finally {
      delete process.env["ETCD_NAME"];
    }
    note(`killed member healthy again ${Date.now() - restartMs} ms after start()`);
    assert.ok(leader.running());
    assert.notEqual(leader.pid, killedPid);
    assert.equal(await open(leader.clientUrl).get("after-kill").string(), "written", "the restarted member caught up");
    await cluster.waitHealthy();
  });

  it("elects a new leader when the leader is paused (SIGSTOP), and takes the old one back on resume", async () => {
    const leader = await cluster.leader(LEADER_TIMEOUT_MS);
    const pauseMs = Date.now();
    leader.pause();
    try {
      assert.ok(leader.paused());
      const next = await cluster.leader(LEADER_TIMEOUT_MS);
      note(`new leader ${Date.now() - pauseMs} ms after SIGSTOP of the leader`);
      assert.notEqual(next.name, leader.name);
      const others = cluster.members.filter((m) => m !== leader).map((m) => m.clientUrl);
      await open(others).put("during-pause").value("yes");
      // The paused member answers nothing: a call to it alone times out.
      await assert.rejects(open(leader.clientUrl).get("during-pause").options({ deadline: Date.now() + 500 }).string());
    } finally {
      leader.resume();
    }
    assert.equal(leader.paused(), false);
    await cluster.waitHealthy();
    assert.equal(await open(leader.clientUrl).get("during-pause").string(), "yes");
  });

  it("a client behind the proxy times out in a blackhole and works again after pass()", async () => {
    const member = cluster.members[0] as EtcdMember;
    assert.equal(member.clientUrl, `http://127.0.0.1:${member.clientPort}`);
    const proxy = await startTcpProxy({ targetPort: member.clientPort });
    proxies.push(proxy);
    const behind = open(proxy.url());
    await behind.put("proxied").value("1");
    assert.ok(proxy.bytesToTarget() > 0 && proxy.bytesToClient() > 0);

    proxy.blackhole();
    const callMs = Date.now();
    await assert.rejects(behind.get("proxied").options({ deadline: Date.now() + 1_000 }).string(), /deadline|DEADLINE/i);
    const waitedMs = Date.now() - callMs;
    note(`a call through the blackhole failed after ${waitedMs} ms (deadline 1000 ms)`);
    assert.ok(waitedMs >= 900, `the call waited for its deadline (${waitedMs} ms), not a reset`);
    assert.ok(proxy.droppedBytes() > 0);
    assert.ok(proxy.connections() >= 1, "the blackhole keeps the connection open");
    // etcdctl through the blackhole fails too (dial or command timeout), it does not hang.
    await assert.rejects(etcdctl(proxy.url(), "--dial-timeout", "500ms", "--command-timeout", "500ms", "get", "proxied"), /etcdctl failed/);

    await proxy.pass();
    const passMs = Date.now();
    // etcd3's default circuit breaker keeps a host it saw fail 3 times blocked for 5 s; poll past it.
    const value = await waitFor(
      "a get through the proxy after pass()",
      async () => {
        try {
          return (await behind.get("proxied").options({ deadline: Date.now() + 1_000 }).string()) ?? "";
        } catch {
          return undefined;
        }
      },
      { timeoutMs: 10_000, intervalMs: 100 },
    );
    note(`the same client works again ${Date.now() - passMs} ms after pass()`);
    assert.equal(value, "1");
    assert.equal(await etcdctl(proxy.url(), "get", "proxied", "--print-value-only"), "1\n");

    await proxy.cut();
    await assert.rejects(etcdctl(proxy.url(), "--dial-timeout", "500ms", "--command-timeout", "500ms", "get", "proxied"), /etcdctl failed: .*\n[^]*(connection refused|deadline exceeded)/);
    await proxy.pass();
    assert.equal(await etcdctl(proxy.url(), "get", "proxied", "--print-value-only"), "1\n");
  });

  it("errors name the member and end with its log; etcdctl needs endpoints and ignores the caller's ETCDCTL_*", async () => {
    const member = cluster.members[1] as EtcdMember;
    await assert.rejects(member.start(), (error: Error) => {
      assert.match(error.message, new RegExp(`^etcd member m1 \\(${member.clientUrl}\\): already running\\n--- last lines of ${member.logFile}\\n\\{`));
      return true;
    });
    assert.match(cluster.describe(), /--- etcd member m0 http:\/\/127\.0\.0\.1:\d+: running \(pid \d+\); last lines of/);
    await assert.rejects(etcdctl([], "get", "x"), /no endpoints given/);
    await assert.rejects(etcdctl("127.0.0.1:2379", "get", "x"), /is not a client URL/);
    process.env["ETCDCTL_ENDPOINTS"] = "http://127.0.0.1:1";
    try {
      assert.equal(await etcdctl(cluster.endpointsFlag, "get", "k2", "--print-value-only"), "v2\n");
    } finally {
      delete process.env["ETCDCTL_ENDPOINTS"];
    }
  });
});

describe("etcd test cluster (1 member)", () => {
  it("starts, serves, stops and leaves nothing behind", async () => {
    const cluster = await startEtcdCluster({ members: 1 });
    try {
      assert.equal(cluster.members.length, 1);
      const only = cluster.members[0] as EtcdMember;
      assert.equal((await cluster.leader()).name, only.name);
      assert.match(await etcdctl(cluster.endpointsFlag, "put", "a", "b"), /^OK/);
      assert.equal(await etcdctl(cluster.endpointsFlag, "get", "a", "--print-value-only"), "b\n");
    } finally {
      await cluster.stop();
    }
    assert.equal(cluster.members[0]?.running(), false);
    assert.equal(existsSync(cluster.dir), false);
    await assert.rejects(startEtcdCluster({ members: 2 as 3 }), /members must be 1 or 3, not 2/);
  });
});
