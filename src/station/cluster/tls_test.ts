// Several stations over HTTPS (--etcd with --tls-cert): a follower forwards
// to the leader over HTTPS and verifies its certificate. Stations A and B
// share one certificate (SAN 127.0.0.1): the admin CLI asking B, which
// follows, gets the leader's answer, and a change made through B is there.
// Station C has a certificate of its own that does not vouch for A's: its
// forwards are refused by certificate verification, and it says so (503,
// naming the leader and the certificate problem), instead of talking to an
// unverified peer.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:https";
import { readFileSync } from "node:fs";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { run, runOk } from "../../testing/process.ts";
import { startEtcdStation, until } from "../../testing/stations.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { IPSAN_BIN } from "../../testing/unit.ts";
import type { RunningStation } from "../harness.ts";

let etcd: EtcdCluster;
let dirs: TempDir;
const stations: RunningStation[] = [];

before(async () => {
  etcd = await startEtcdCluster({ members: 1, prefix: "tls" });
  dirs = makeTempDir("cluster-tls", memoryTmpBase());
  for (const name of ["shared", "other"]) {
    await runOk("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", dirs.file(`${name}.key`), "-out", dirs.file(`${name}.pem`), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], { timeoutMs: 30_000 });
  }
});
after(async () => {
  for (const station of stations) await station.close().catch(() => undefined);
  await etcd?.stop();
  dirs?.remove();
});

/** One HTTPS request trusting `caFile`; resolves to status and body text. */
function get(url: string, token: string, caFile: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers: { authorization: `Bearer ${token}` }, ca: readFileSync(caFile), timeout: 10_000 }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end();
  });
}

async function start(name: string, cert: string): Promise<RunningStation> {
  const station = await startEtcdStation(dirs, name, etcd, { extraArgs: ["--tls-cert", dirs.file(`${cert}.pem`), "--tls-key", dirs.file(`${cert}.key`)] });
  stations.push(station);
  return station;
}

test("a follower forwards to the leader over HTTPS, verifying its certificate", async () => {
  const a = await start("a", "shared");
  assert.match(a.url, /^https:\/\//);
  const token = a.token();
  await until("A leads", async () => (await get(`${a.url}/api/v1/health`, token, dirs.file("shared.pem")).catch(() => ({ text: "" }))).text.includes('"leader":true'), 15_000);
  const b = await start("b", "shared");
  const health = await get(`${b.url}/api/v1/health`, token, dirs.file("shared.pem"));
  assert.match(health.text, new RegExp(`"leader":false,"leaderUrl":"${a.url.replace(/[.]/g, "\\.")}"`));

  const cli = (args: string[]) => run(process.execPath, [IPSAN_BIN, ...args, "--station", b.url, "--token-file", `${b.dataDir}/admin.token`, "--ca-file", dirs.file("shared.pem")], { timeoutMs: 30_000 });
  const registered = await cli(["hosts", "register", "tls-host", "--address", "127.0.0.7"]);
  assert.equal(registered.code, 0, registered.stderr + registered.stdout);
  const listed = await cli(["hosts", "--json"]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.ok((JSON.parse(listed.stdout) as { items: { name: string }[] }).items.some((h) => h.name === "tls-host"), "the change made through the follower is at the leader");

  const c = await start("c", "other");
  const refused = await get(`${c.url}/api/v1/hosts`, token, dirs.file("other.pem"));
  assert.equal(refused.status, 503, refused.text);
  assert.match(refused.text, new RegExp(`cannot reach the leading station ${a.url.replace(/[.]/g, "\\.")}: .*(self-signed|certificate)`, "i"));
});

test("a station listening on every address must say where the others reach it (--advertise-url)", async () => {
  const refused = await run(process.execPath, [IPSAN_BIN, "station", "--data", dirs.file("any"), "--http", "0.0.0.0:0", "--discovery", "127.0.0.1:0", "--etcd", etcd.endpointsFlag], { timeoutMs: 30_000 });
  assert.equal(refused.code, 2, refused.stderr);
  assert.match(refused.stderr, /listens on every address: give --advertise-url URL/);
  const mismatch = await run(process.execPath, [IPSAN_BIN, "station", "--data", dirs.file("any"), "--etcd", etcd.endpointsFlag, "--advertise-url", "https://127.0.0.1:1"], { timeoutMs: 30_000 });
  assert.equal(mismatch.code, 2, mismatch.stderr);
  assert.match(mismatch.stderr, /https:\/\/ needs --tls-cert/);
});
