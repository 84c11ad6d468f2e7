// The host side end to end, with the real station and unit: `ipsan host
// request` gets a volume (no --address: the station registers 127.0.0.1, the
// address the NBD connections will come from); `ipsan host attach` prints a
// file path (nbdfuse: there is no /dev/nbd here); bytes written into it with
// dd are what nbdsh reads straight from the unit. `ipsan host agent` shows the
// host online at the station, and after nbdfuse is killed (what a host restart
// does) re-attaches from the state dir by itself, with the same bytes; it stops
// on SIGTERM with status 0. It re-attaches even while the station is dead
// (kill -9): the records are enough. `detach` removes the mount; `release` detaches
// and unassigns, after which the unit refuses the volume.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { IpsanChild } from "../demo/child.ts";
import type { Assignment } from "../host/station_client.ts";
import { decodeRecord, recordKey } from "../host/state.ts";
import { isMounted, processAlive } from "../host/attach.ts";
import { childEnv, describeResult, run, runOk, waitFor } from "../testing/process.ts";
import { San, ipsan } from "./harness.ts";
import { nbdsh } from "../testing/clients.ts";

const MIB = 1024 * 1024;

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

test("host request/attach (nbdfuse)/agent re-attach/detach/release against a real station and unit", { timeout: 120_000 }, async () => {
  const san = new San("host");
  let agent: IpsanChild | undefined;
  try {
    const station = await san.startStation();
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const stateDir = san.tmp.file("host-state");
    const common = ["--station", station.apiUrl, "--token-file", station.tokenFile, "--host", "h1"];
    const assignment = (await san.host(["request", ...common, "--size", "32M", "--state-dir", stateDir, "--json"])).json as Assignment;
    // The unit speaks TLS (the managed default): the URI names the host and carries its key file.
    assert.match(assignment.uri, /^nbds:\/\/h1@127\.0\.0\.1:\d+\/\S+\?tls-psk-file=/);
    assert.equal(assignment.sizeBytes, 32 * MIB);
    assert.equal(assignment.hostAddress, "127.0.0.1");

    // Human-readable form of the same command names the URI.
    const readable = await san.host(["request", ...common, "--size", "32M", "--state-dir", stateDir, "--request-id", String(assignment.requestId)]);
    assert.ok(readable.result.stdout.includes(`uri ${assignment.uri}`), `a retried request id gives the same assignment: ${readable.result.stdout}`);

    const attached = await san.host(["attach", ...common, "--assignment", String(assignment.id), "--state-dir", stateDir]);
    const path = attached.result.stdout.trim();
    assert.ok(path.startsWith(stateDir) && existsSync(path), `attach prints a file path: ${path}`);
    const pattern = randomBytes(MIB);
    writeFileSync(san.tmp.file("pattern"), pattern);
    await runOk("dd", [`if=${san.tmp.file("pattern")}`, `of=${path}`, "bs=64K", "seek=16", "conv=notrunc,fsync", "status=none"]);
    const direct = await nbdsh(assignment.uri, `import hashlib; print(hashlib.sha256(h.pread(${MIB}, ${MIB})).hexdigest())`);
    assert.equal(direct.stdout.trim(), sha256(pattern), "bytes written into the attached file are on the unit");

    const byVolume = await san.host(["attach", ...common, "--volume", `u1/${assignment.export}`, "--state-dir", stateDir]);
    assert.equal(byVolume.result.stdout.trim(), path, "attach by UNIT/VOLUME finds the same attachment");

    // The agent: heartbeats make the host online; a dead nbdfuse is brought back.
    agent = new IpsanChild(["host", "agent", ...common, "--heartbeat-ms", "200", "--state-dir", stateDir], {
      name: "agent",
      logFile: san.log("agent"),
      env: childEnv(),
    });
    await agent.waitForLine(/^ipsan host agent h1 running/, 10_000);
    const client = await san.client();
    await waitFor("h1 online", async () => (await client.hosts()).find((h) => h.name === "h1" && h.state === "online"), {
      timeoutMs: 10_000,
    });
    const recordPath = `${stateDir}/attachments/${recordKey(String(assignment.id))}.json`;
    const readRecord = () => {
      const decoded = decodeRecord(readFileSync(recordPath, "utf8"));
      assert.equal(decoded.kind, "record");
      if (decoded.kind !== "record") throw new Error("unreadable record");
      return decoded.record;
    };
    const first = readRecord();
    assert.ok(first.pid !== null && processAlive(first.pid));
    process.kill(first.pid ?? 0, "SIGKILL");
    const second = await waitFor(
      "the agent re-attaches",
      () => {
        const r = readRecord();
        return r.pid !== first.pid && r.pid !== null && processAlive(r.pid) ? r : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 100 },
    );
    assert.equal(second.path, path);
    await runOk("dd", [`if=${path}`, `of=${san.tmp.file("back")}`, "bs=64K", "skip=16", "count=16", "status=none"]);
    assert.equal(sha256(readFileSync(san.tmp.file("back"))), sha256(pattern), "same bytes after re-attach");

    // Out-of-band on the host side too: with the station dead (kill -9), the agent re-attaches
    // from its records alone.
    station.child.signal("SIGKILL");
    await station.child.exited;
    process.kill(second.pid ?? 0, "SIGKILL");
    const third = await waitFor(
      "the agent re-attaches while the station is down",
      () => {
        const r = readRecord();
        return r.pid !== second.pid && r.pid !== null && processAlive(r.pid) ? r : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 100 },
    );
    await runOk("dd", [`if=${path}`, `of=${san.tmp.file("back2")}`, "bs=64K", "skip=16", "count=16", "status=none"]);
    assert.equal(sha256(readFileSync(san.tmp.file("back2"))), sha256(pattern), "same bytes, re-attached without the station");
    await san.startStation({ dataDir: station.dataDir, http: new URL(station.apiUrl).host, discovery: station.discovery });
    await san.waitUnits(["u1"]);
    const client2 = await san.client();

    const stopped = await agent.stop("SIGTERM");
    assert.equal(stopped.code, 0, "agent exits 0 on SIGTERM");
    assert.ok(agent.lines.some((l) => l === "ipsan host agent h1 stopped"));

    const detached = await san.host(["detach", "--assignment", String(assignment.id), "--state-dir", stateDir]);
    assert.match(detached.result.stdout, /^detached /);
    assert.equal(await isMounted(third.mountpoint ?? ""), false, "detach removes the mount");
    assert.equal(existsSync(path), false);
    assert.equal(processAlive(third.pid ?? 0), false, "nbdfuse exited");
    const notAttached = await ipsan(["host", "detach", "--assignment", String(assignment.id), "--state-dir", stateDir]);
    assert.equal(notAttached.code, 1, describeResult(notAttached));
    assert.match(notAttached.stderr, /not attached/);

    await san.host(["attach", ...common, "--assignment", String(assignment.id), "--state-dir", stateDir]);
    const released = await san.host(["release", ...common, "--assignment", String(assignment.id), "--state-dir", stateDir, "--json"]);
    assert.deepEqual((released.json as { released: string }).released, String(assignment.id));
    assert.equal(existsSync(path), false, "release detached first");
    const live = (await client2.assignments()).filter((a) => a.id === assignment.id);
    assert.deepEqual(live, [], "the station no longer lists the assignment");
    const refused = await run("nbdinfo", ["--size", assignment.uri], { timeoutMs: 15_000 });
    assert.notEqual(refused.code, 0, "after release the unit refuses the host");
  } finally {
    await agent?.stop("SIGKILL");
    await san.close();
  }
});
