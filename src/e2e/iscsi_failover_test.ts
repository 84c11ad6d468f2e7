// Spare-host failover of an iSCSI assignment (issue 10 loose end), with a
// real station, a real unit serving iSCSI (its default --tls require: grants
// by host identity, CHAP secrets derived from the host's key) and real
// initiators:
// - h1 (registered as 127.0.0.2, IQN_H1) is assigned a volume over iSCSI,
//   writes 4 MiB into it with qemu-img (libiscsi) and keeps a session of its
//   own open (src/iscsi/testing/initiator.ts), then goes silent;
// - a spare (`ipsan host agent --spare --iqn IQN_SPARE`, on 127.0.0.1)
//   starts; after --host-failover-after the station fences h1 and moves the
//   assignment to the spare: the unit's grant names the spare and its IQN;
// - at the unit h1 is fenced: its open session is closed at once, a new login
//   with h1's IQN and CHAP secret is refused (the raw initiator and
//   iscsi-inq), and the spare's secret with h1's IQN is refused too;
// - the spare's agent records the moved assignment (`ipsan host list`:
//   protocol iscsi, its portal and target) and writes the spare's CHAP secret;
//   with it, iscsi-inq logs in as IQN_SPARE and qemu-img reads exactly the
//   bytes h1 wrote.
// The canary runs the same scenario with units whose iSCSI connections
// ignore a revoked device (src/testing/patched_build.ts): h1's open session
// then outlives the failover, and the scenario must fail.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { IpsanChild } from "../demo/child.ts";
import type { Assignment } from "../host/station_client.ts";
import { iscsiTargetName } from "../iscsi/names.ts";
import { RawInitiator } from "../iscsi/testing/initiator.ts";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import { childEnv, describeResult, run, runOk, waitFor } from "../testing/process.ts";
import { REPO_ROOT } from "../testing/unit.ts";
import { San, ipsan } from "./harness.ts";
import { onlyTheGrantedInitiator } from "./iscsi_station_scenario.ts";

const MIB = 1024 * 1024;
const IQN_H1 = "iqn.1994-05.com.redhat:h1-failover";
const IQN_SPARE = "iqn.1994-05.com.redhat:spare-failover";
const COMMAND_TIMEOUT_MS = 30_000;
/** How long the old host's open session may outlive the move (the unit closes it when the grant changes). */
const SESSION_CLOSE_MS = 5_000;

const builds: PatchedBuild[] = [];
after(() => {
  for (const build of builds) build.remove();
});

/** qemu's iscsi driver options for one initiator (the CHAP secret stays in its file, passed as a qemu secret object). */
function qemuIscsi(portal: string, target: string, user: string, iqn: string): string {
  return `driver=iscsi,transport=tcp,portal=${portal},target=${target},lun=0,user=${user},password-secret=chap,initiator-name=${iqn}`;
}

function splitPortal(portal: string): { host: string; port: number } {
  const colon = portal.lastIndexOf(":");
  return { host: portal.slice(0, colon), port: Number(portal.slice(colon + 1)) };
}

async function iscsiFailover(name: string, bin?: string): Promise<void> {
  const san = new San(name);
  let agent: IpsanChild | undefined;
  let session: RawInitiator | undefined;
  try {
    const station = await san.startStation({ extraArgs: ["--host-failover-after", "2s", "--host-offline-after-ms", "1500"] });
    await san.startUnit("u1", { extraArgs: ["--iscsi", "127.0.0.1:0"], ...(bin === undefined ? {} : { bin }) });
    await san.waitUnits(["u1"]);
    const client = await san.client();
    const common = (host: string) => ["--station", station.apiUrl, "--token-file", station.tokenFile, "--host", host];
    await waitFor("the station knows u1's portal", async () => ((await client.units()).find((u) => u.name === "u1")?.iscsi?.portal ?? undefined), { timeoutMs: 10_000 });

    // h1: an iSCSI assignment, its CHAP secret, 4 MiB written through libiscsi (qemu-img).
    const h1State = san.tmp.file("h1-state");
    const a = (await san.host(["request", ...common("h1"), "--address", "127.0.0.2", "--iqn", IQN_H1, "--size", "16M", "--protocol", "iscsi", "--state-dir", h1State, "--json"]))
      .json as Assignment;
    assert.equal(a.protocol, "iscsi");
    const iscsi = a.iscsi;
    assert.ok(iscsi !== undefined && iscsi !== null && iscsi.chapUser === "h1", JSON.stringify(a.iscsi));
    const { portal, target } = iscsi;
    assert.equal(target, iscsiTargetName("u1", a.export));
    await san.host(["attach", ...common("h1"), "--assignment", a.id, "--state-dir", h1State, "--json"]);
    const h1SecretFile = join(h1State, "keys", "u1.chap");
    const h1Secret = readFileSync(h1SecretFile, "utf8");
    const pattern = randomBytes(4 * MIB);
    const source = san.tmp.file("pattern.raw");
    writeFileSync(source, pattern);
    await runOk("qemu-img", ["convert", "-n", "-f", "raw", "--object", `secret,id=chap,file=${h1SecretFile}`, "--target-image-opts", source, qemuIscsi(portal, target, "h1", IQN_H1)], {
      timeoutMs: 60_000,
    });
    // h1 keeps a session open (as a host's initiator would), logged in with its IQN and secret.
    const at = splitPortal(portal);
    session = await RawInitiator.connect(at.host, at.port);
    assert.equal((await session.login({ initiatorName: IQN_H1, targetName: target, chap: { user: "h1", secret: h1Secret } })).status, 0, "h1 logs in before the failover");
    await session.ready();
    const before = await session.read10(0, 8);
    assert.equal(before.status, 0);
    assert.ok(before.data.equals(pattern.subarray(0, 4096)), "h1's session reads what qemu-img wrote");

    // The spare, with its own IQN; h1 is silent from here on.
    const spareState = san.tmp.file("spare-state");
    agent = new IpsanChild(
      ["host", "agent", ...common("spare"), "--spare", "--iqn", IQN_SPARE, "--address", "127.0.0.1", "--heartbeat-ms", "200", "--state-dir", spareState],
      { name: "spare-agent", logFile: san.log("spare-agent"), env: childEnv() },
    );
    await agent.waitForLine(/^ipsan host agent spare running .*\(spare\)$/, 15_000);
    const moved = await waitFor(
      "the assignment moved to the spare",
      async () => {
        const current = (await client.call("GET", `/api/v1/assignments/${a.id}`)) as Assignment & { movedAt: string | null };
        return current.host === "spare" && current.movedAt !== null ? current : undefined;
      },
      { timeoutMs: 30_000, intervalMs: 100 },
    );
    assert.equal(moved.movedFrom, "h1");
    assert.deepEqual(moved.iscsi, { ...iscsi, chapUser: "spare" }, "the same target and portal, the spare's CHAP user");

    // The unit's grant: the spare's identity and IQN only.
    const unit = san.units.get("u1");
    assert.ok(unit !== undefined);
    const token = readFileSync(join(unit.dataDir, "control.token"), "utf8").trim();
    const access = async (): Promise<unknown> => {
      const response = await fetch(`${unit.control}/v1/volumes/${a.volume}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) });
      return ((await response.json()) as { access: unknown }).access;
    };
    await waitFor("the unit grants the spare", async () => (JSON.stringify(await access()).includes(IQN_SPARE) ? true : undefined), { timeoutMs: 10_000 });
    assert.deepEqual(await access(), [{ host: "spare", export: a.volume, from: [], iqn: IQN_SPARE }]);

    // Fenced at the unit: h1's open session is gone, a new login as h1 is refused.
    assert.equal(await session.waitClosed(SESSION_CLOSE_MS), true, `h1's open iSCSI session outlived the failover by ${SESSION_CLOSE_MS} ms`);
    session.close();
    session = await RawInitiator.connect(at.host, at.port);
    const again = await session.login({ initiatorName: IQN_H1, targetName: target, chap: { user: "h1", secret: h1Secret } });
    assert.notEqual(again.status, 0, "h1 logged in again after it was fenced");
    session.close();
    session = undefined;
    const inqH1 = await run("iscsi-inq", ["-i", IQN_H1, `iscsi://h1@${portal}/${target}/0`], { timeoutMs: COMMAND_TIMEOUT_MS, env: { LIBISCSI_CHAP_PASSWORD: h1Secret } });
    assert.notEqual(inqH1.code, 0, `iscsi-inq as the fenced h1 logged in: ${describeResult(inqH1)}`);

    // The spare's agent recorded it and wrote the spare's CHAP secret.
    const spareSecretFile = join(spareState, "keys", "u1.chap");
    const listed = await waitFor(
      "the spare's agent records the iSCSI assignment",
      async () => {
        const list = await ipsan(["host", "list", "--state-dir", spareState, "--json"]);
        const items = (JSON.parse(list.stdout || "{}") as { items?: Record<string, unknown>[] }).items ?? [];
        return items.find((i) => i["assignment"] === a.id);
      },
      { timeoutMs: 30_000, intervalMs: 200 },
    );
    assert.deepEqual([listed["protocol"], listed["mode"], listed["alive"], listed["iscsi"]], [
      "iscsi",
      "iscsi",
      true,
      { portal, target, lun: 0, chapUser: "spare", chapSecretFile: spareSecretFile },
    ]);
    const spareSecret = readFileSync(spareSecretFile, "utf8");
    assert.notEqual(spareSecret, h1Secret);
    // Only the spare's initiator gets in with the spare's secret (h1's IQN is refused with it).
    await onlyTheGrantedInitiator({ portal, target, chapUser: "spare", secret: spareSecret, granted: IQN_SPARE, other: IQN_H1 });
    // The spare reads what h1 wrote.
    const copy = san.tmp.file("copy.raw");
    await runOk("qemu-img", ["convert", "--object", `secret,id=chap,file=${spareSecretFile}`, "--image-opts", qemuIscsi(portal, target, "spare", IQN_SPARE), "-O", "raw", copy], { timeoutMs: 60_000 });
    const read = readFileSync(copy);
    assert.equal(read.length, 16 * MIB);
    const digest = (bytes: Buffer): string => createHash("sha256").update(bytes).digest("hex");
    assert.equal(digest(read.subarray(0, 4 * MIB)), digest(pattern), "the spare reads the bytes h1 wrote");
    assert.equal((await agent.stop("SIGTERM")).code, 0);
    agent = undefined;
  } finally {
    session?.close();
    await agent?.stop("SIGKILL");
    await san.close();
  }
}

test("an iSCSI assignment moves to a spare host: the spare's IQN granted, the old host fenced at the unit, the spare reads its data", { timeout: 180_000 }, async () => {
  await iscsiFailover("iscsi-failover");
});

test("canary: with units whose iSCSI sessions ignore a revoked device, the old host's session outlives the failover", { timeout: 180_000 }, async () => {
  const build = patchedBuild(
    "canary-iscsi-failover-revoke",
    [{ file: "dist/iscsi/connection.js", from: "this.#device?.onRevoked?.((error) => this.revoked(error));", to: "/* canary: revocation ignored */" }],
    REPO_ROOT,
    { nodeModules: true },
  );
  builds.push(build);
  await assert.rejects(iscsiFailover("iscsi-failover-canary", build.ipsanBin), /h1's open iSCSI session outlived the failover/);
});
