// iSCSI through the station and the host (issue 10, control-plane half), with
// a real station, real units (their default, --tls require: grants by host
// identity) and the real `ipsan` CLI:
// - refusals, each saying how to proceed: a bad IQN (400 on iqn); protocol
//   iscsi for a host without an IQN (409 on host), with copies > 1 (400 on
//   protocol), on a pool where no unit serves iSCSI (409 on protocol), on a
//   unit that serves none (manual assign, 409 on unit); --mode iscsi for an
//   NBD assignment;
// - with a unit serving iSCSI (--iscsi) beside one that does not: the
//   allocation goes to the iSCSI unit even where NBD placement would not;
//   the answer keeps every field and adds protocol, iscsi {portal, target,
//   lun, chapUser} and the iscsi:// URI; the unit holds the grant with the
//   host's IQN (GET /v1/volumes/NAME), and a new IQN moves the grant; attach
//   writes the CHAP secret (0600, chapSecret(key, "initiator")) and prints
//   the login; the assignment, the host's IQN and the unit's portal survive
//   a station restart; and libiscsi's tools and qemu log in with that secret.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Assignment, StationClient } from "../host/station_client.ts";
import { chapSecret, iscsiTargetName } from "../iscsi/names.ts";
import { type CommandResult, describeResult, run, waitFor } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { San, ipsan } from "./harness.ts";
import { onlyTheGrantedInitiator } from "./iscsi_station_scenario.ts";

const IQN = "iqn.1994-05.com.redhat:h1-initiator";
const IQN2 = "iqn.1994-05.com.redhat:h1-renamed";
const COMMAND_TIMEOUT_MS = 30_000;

/** The station's refusal of a call: status, code, field and message. */
async function refusal(call: Promise<unknown>): Promise<{ status: number; code: string; field: string | undefined; message: string }> {
  try {
    await call;
  } catch (error) {
    const e = error as { status?: number; code?: string; field?: string; message: string };
    return { status: e.status ?? 0, code: e.code ?? "", field: e.field, message: e.message };
  }
  throw new Error("the call was accepted; a refusal was expected");
}

async function unitControl(san: San, unit: string, path: string): Promise<unknown> {
  const process = san.units.get(unit);
  if (process === undefined) throw new Error(`no unit ${unit}`);
  const token = readFileSync(join(process.dataDir, "control.token"), "utf8").trim();
  const response = await fetch(`${process.control}${path}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) });
  assert.equal(response.status, 200, `GET ${path} on ${unit}`);
  return response.json();
}

function allocate(client: StationClient, body: Record<string, unknown>): Promise<unknown> {
  return client.call("POST", "/api/v1/allocations", { requestId: `r-${Math.random().toString(16).slice(2)}`, host: "h1", sizeBytes: "8M", ...body });
}

function failed(result: CommandResult, code: number, pattern: RegExp): void {
  assert.equal(result.code, code, describeResult(result));
  assert.match(result.stderr, pattern, describeResult(result));
}

test("iSCSI refusals: bad IQN, no IQN, a mirror, no unit serving iSCSI, --mode iscsi on NBD", { timeout: 120_000 }, async () => {
  const san = new San("iscsi-refusals");
  try {
    const station = await san.startStation();
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const client = await san.client();
    const admin = ["--station", station.apiUrl, "--token-file", station.tokenFile];

    const bad = await refusal(client.registerHost("h1", "127.0.0.1", undefined, "IQN.1994-05.com.redhat:H1"));
    assert.deepEqual([bad.status, bad.code, bad.field], [400, "INVALID_ARGUMENT", "iqn"], bad.message);
    assert.match(bad.message, /capital letters.*"iqn\.1994-05\.com\.redhat:h1"/);
    assert.equal((await refusal(client.registerHost("h1", "127.0.0.1", undefined, "client1"))).field, "iqn");

    await client.registerHost("h1", "127.0.0.1");
    const noIqn = await refusal(allocate(client, { protocol: "iscsi" }));
    assert.deepEqual([noIqn.status, noIqn.code, noIqn.field], [409, "CONFLICT", "host"], noIqn.message);
    assert.match(noIqn.message, /host h1 has no iSCSI initiator name \(IQN\) registered.*ipsan hosts register h1 --address IP --iqn IQN.*or use protocol nbd/);
    const viaCli = await ipsan(["host", "request", ...admin, "--host", "h1", "--size", "8M", "--protocol", "iscsi"]);
    failed(viaCli, 1, /409 CONFLICT.*no iSCSI initiator name/);
    failed(await ipsan(["host", "request", ...admin, "--host", "h1", "--size", "8M", "--protocol", "scsi"]), 2, /--protocol: invalid "scsi" \(expected nbd or iscsi\)/);
    failed(await ipsan(["host", "request", ...admin, "--host", "h1", "--size", "8M", "--iqn", "Bad"]), 2, /--iqn: "Bad" has capital letters/);

    const registered = await ipsan(["hosts", "register", "h1", ...admin, "--address", "127.0.0.1", "--iqn", IQN]);
    assert.equal(registered.code, 0, describeResult(registered));
    assert.match(registered.stdout, new RegExp(`host h1 registered at 127\\.0\\.0\\.1, iSCSI initiator ${IQN.replaceAll(".", "\\.")}`));
    assert.equal((await client.hosts()).find((h) => h.name === "h1")?.iqn, IQN);
    const listed = await ipsan(["hosts", ...admin]);
    assert.match(listed.stdout, /^NAME\s+ADDRESS\s+STATE\s+SEEN\s+SPARE\s+IQN$/m);

    // The config file's "iqn" (and $IPSAN_IQN) for host commands: a heartbeat records it, the address stays.
    await client.registerHost("h3", "127.0.0.9");
    const config = san.tmp.file("ipsan.conf");
    writeFileSync(config, "iqn = iqn.1998-01.com.vmware:h3-esx\n");
    const fromConfig = await run(process.execPath, [IPSAN_BIN, "host", "request", ...admin, "--host", "h3", "--size", "8M", "--protocol", "iscsi"], {
      env: { IPSAN_CONFIG: config },
      timeoutMs: COMMAND_TIMEOUT_MS,
    });
    failed(fromConfig, 1, /409 CONFLICT.*no unit in the pool serves iSCSI/);
    const h3 = (await client.hosts()).find((h) => h.name === "h3");
    assert.deepEqual([h3?.iqn, h3?.address], ["iqn.1998-01.com.vmware:h3-esx", "127.0.0.9"]);
    failed(await run(process.execPath, [IPSAN_BIN, "host", "request", ...admin, "--host", "h3", "--size", "8M"], { env: { IPSAN_IQN: "h3" } }), 2, /--iqn: "h3" is not an iSCSI name/);

    // A host with its own credential (join token): register --iqn records it; request --iqn changes it (a heartbeat, address kept).
    const join = await ipsan(["hosts", "token", "create", ...admin, "--host", "h4"]);
    assert.equal(join.code, 0, describeResult(join));
    writeFileSync(san.tmp.file("h4.join"), join.stdout.trim());
    const state4 = san.tmp.file("h4-state");
    await san.host(["register", "--station", station.apiUrl, "--token-file", san.tmp.file("h4.join"), "--host", "h4", "--address", "127.0.0.4", "--iqn", "iqn.1991-05.com.microsoft:h4", "--state-dir", state4]);
    assert.equal((await client.hosts()).find((h) => h.name === "h4")?.iqn, "iqn.1991-05.com.microsoft:h4");
    failed(await ipsan(["host", "request", "--state-dir", state4, "--size", "8M", "--protocol", "iscsi", "--iqn", "iqn.1991-05.com.microsoft:h4.example.com"]), 1, /no unit in the pool serves iSCSI/);
    const h4 = (await client.hosts()).find((h) => h.name === "h4");
    assert.deepEqual([h4?.iqn, h4?.address], ["iqn.1991-05.com.microsoft:h4.example.com", "127.0.0.4"]);

    const mirror = await refusal(allocate(client, { protocol: "iscsi", copies: 2 }));
    assert.deepEqual([mirror.status, mirror.field], [400, "protocol"], mirror.message);
    assert.match(mirror.message, /single copy only.*mirror engine, which speaks NBD/);
    const none = await refusal(allocate(client, { protocol: "iscsi" }));
    assert.deepEqual([none.status, none.field], [409, "protocol"], none.message);
    assert.match(none.message, /no unit in the pool serves iSCSI \(1 unit, none reports an iSCSI portal\): start units with --iscsi HOST:PORT/);
    const dry = await refusal(allocate(client, { protocol: "iscsi", dryRun: true }));
    assert.equal(dry.status, 409, "a dry run is refused the same way");
    const manual = await refusal(client.call("POST", "/api/v1/assignments", { host: "h1", unit: "u1", volume: "v1", protocol: "iscsi" }));
    assert.deepEqual([manual.status, manual.field], [409, "unit"], manual.message);
    assert.match(manual.message, /unit u1 serves no iSCSI \(its \/v1\/info reports no portal: start it with --iscsi HOST:PORT\)/);
    const unknown = await refusal(allocate(client, { protocol: "scsi" }));
    assert.deepEqual([unknown.status, unknown.field], [400, "protocol"], unknown.message);
    assert.equal((await client.units())[0]?.iscsi, null, "the unit view says it serves no iSCSI");

    // NBD as before: protocol nbd, no iscsi; attach --mode iscsi refuses it.
    const state = san.tmp.file("h1-state");
    const nbd = (await san.host(["request", ...admin, "--host", "h1", "--size", "8M", "--state-dir", state, "--json"])).json as Assignment;
    assert.equal(nbd.protocol, "nbd");
    assert.equal(nbd.iscsi, null);
    assert.match(nbd.uri, /^nbds:\/\/h1@/);
    failed(
      await ipsan(["host", "attach", ...admin, "--host", "h1", "--assignment", nbd.id, "--mode", "iscsi", "--state-dir", state]),
      2,
      /--mode iscsi: assignment \S+ is served over NBD .*ipsan host request \.\.\. --protocol iscsi/,
    );
    // host list names the protocol: nbd here, with no iscsi part.
    await san.host(["attach", ...admin, "--host", "h1", "--assignment", nbd.id, "--mode", "nbd", "--state-dir", state, "--json"]);
    const nbdListed = (await san.host(["list", "--state-dir", state, "--json"])).json as { items: Record<string, unknown>[] };
    assert.deepEqual(
      nbdListed.items.map((i) => [i["assignment"], i["protocol"], i["mode"], i["iscsi"]]),
      [[nbd.id, "nbd", "nbd", null]],
    );
  } finally {
    await san.close();
  }
});

test(
  "an iSCSI assignment: placed on the unit that serves iSCSI, the grant names the host's IQN, the answer and attach say where to log in, a restart keeps it",
  { timeout: 240_000 },
  async () => {
    const san = new San("iscsi-station");
    try {
      const station = await san.startStation();
      // u2 (smaller, no iSCSI) is the best fit for NBD; protocol iscsi must go to u1.
      await san.startUnit("u1", { capacity: "256M", extraArgs: ["--iscsi", "127.0.0.1:0"] });
      await san.startUnit("u2", { capacity: "64M" });
      // u3: iSCSI without TLS (--insecure-plaintext: address grants, no CHAP); larger, so u1 fits best.
      await san.startUnit("u3", { capacity: "1G", extraArgs: ["--iscsi", "127.0.0.1:0", "--insecure-plaintext"] });
      await san.waitUnits(["u1", "u2", "u3"]);
      const client = await san.client();
      const admin = ["--station", station.apiUrl, "--token-file", station.tokenFile];
      const info = (await unitControl(san, "u1", "/v1/info")) as { iscsi: { portal: string } | null };
      assert.ok(info.iscsi !== null, "u1 reports its portal");
      const portal = info.iscsi.portal;
      await waitFor("the station knows u1's portal", async () => ((await client.units()).find((u) => u.name === "u1")?.iscsi?.portal === portal ? true : undefined), {
        timeoutMs: 10_000,
      });
      assert.equal((await client.units()).find((u) => u.name === "u2")?.iscsi, null);
      const dry = (await allocate(client, { dryRun: true })) as { placement: { unit: string } };
      assert.equal(dry.placement.unit, "u2", "NBD placement prefers u2 (best fit)");

      const state = san.tmp.file("h1-state");
      const requested = await san.host(["request", ...admin, "--host", "h1", "--address", "127.0.0.1", "--iqn", IQN, "--size", "16M", "--protocol", "iscsi", "--state-dir", state, "--json"]);
      const a = requested.json as Assignment & { iscsi: { portal: string; target: string; lun: number; chapUser: string | null; naa: string | null } };
      assert.equal(a.unit, "u1", "iSCSI placement: only units with a portal");
      assert.equal(a.protocol, "iscsi");
      const target = iscsiTargetName("u1", a.export);
      // The NAA designator the station shows is the unit's own (what its target answers in VPD 0x83, unit-side
      // real_clients_test checks that with iscsi-inq), for the assignment and in the station's volume view.
      const unitNaa = ((await unitControl(san, "u1", `/v1/volumes/${a.volume}`)) as { iscsi: { naa: string } }).iscsi.naa;
      assert.match(unitNaa, /^3[0-9a-f]{15}$/);
      assert.deepEqual(a.iscsi, { portal, target, lun: 0, chapUser: "h1", naa: unitNaa });
      assert.equal(((await client.call("GET", `/api/v1/volumes/u1/${a.volume}`)) as { naa: string | null }).naa, unitNaa);
      assert.equal(a.uri, `iscsi://${portal}/${target}/0`);
      for (const field of ["nbdHost", "nbdPort", "export", "volume", "extents", "sizeBytes", "startLba", "copies", "legs", "state"]) assert.ok(field in a, `the answer keeps ${field}`);
      assert.equal((await client.hosts()).find((h) => h.name === "h1")?.iqn, IQN, "request --iqn registered the IQN");
      const table = await ipsan(["assignments", ...admin]);
      assert.match(table.stdout, /^ID .* COPIES +LEGS +PROTOCOL\n/);
      assert.match(table.stdout, new RegExp(`\\n${a.id} .* iscsi\\n`));
      // Too large for u1: the 507 names u2's reason (no portal), not its free space.
      const tooLarge = await refusal(allocate(client, { protocol: "iscsi", sizeBytes: "1G" }));
      assert.equal(tooLarge.status, 507, tooLarge.message);
      const noSpace = (await client.call("POST", "/api/v1/allocations", { requestId: "r-big", host: "h1", sizeBytes: "1G", protocol: "iscsi", dryRun: true }).catch((e: unknown) => e)) as {
        reasons: { unit: string; reason: string }[];
      };
      assert.deepEqual(
        noSpace.reasons.find((r) => r.unit === "u2")?.reason,
        "serves no iSCSI (its /v1/info reports no portal: start it with --iscsi HOST:PORT)",
      );
      // On u3 (plaintext): no CHAP, so no secret file.
      const plain = (await san.host(["request", ...admin, "--host", "h1", "--size", "300M", "--protocol", "iscsi", "--state-dir", state, "--json"])).json as typeof a;
      assert.equal(plain.unit, "u3");
      assert.equal(plain.iscsi.chapUser, null);
      const plainAttach = (await san.host(["attach", ...admin, "--host", "h1", "--assignment", plain.id, "--state-dir", state, "--json"])).json as Record<string, unknown>;
      assert.deepEqual(plainAttach, { assignment: plain.id, mode: "iscsi", uri: plain.uri, chapUser: null, chapSecretFile: null });
      const u3Portal = plain.iscsi.portal;
      // A requestId used for NBD is not an iSCSI request.
      await client.call("POST", "/api/v1/allocations", { requestId: "r-nbd", host: "h1", sizeBytes: "8M" });
      const reused = await refusal(client.call("POST", "/api/v1/allocations", { requestId: "r-nbd", host: "h1", sizeBytes: "8M", protocol: "iscsi" }));
      assert.deepEqual([reused.status, reused.field], [409, "requestId"], reused.message);

      // The unit's grant names the host's IQN; a new IQN moves it.
      const access = async (): Promise<unknown> => ((await unitControl(san, "u1", `/v1/volumes/${a.volume}`)) as { access: unknown }).access;
      assert.deepEqual(await access(), [{ host: "h1", export: a.volume, from: [], iqn: IQN }]);
      const renamed = await ipsan(["hosts", "register", "h1", ...admin, "--address", "127.0.0.1", "--iqn", IQN2]);
      assert.equal(renamed.code, 0, describeResult(renamed));
      await waitFor("the grant follows the new IQN", async () => (JSON.stringify(await access()).includes(IQN2) ? true : undefined), { timeoutMs: 10_000 });
      assert.deepEqual(await access(), [{ host: "h1", export: a.volume, from: [], iqn: IQN2 }]);
      const removed = await refusal(client.registerHost("h1", "127.0.0.1", undefined, ""));
      assert.deepEqual([removed.status, removed.field], [409, "iqn"], removed.message);
      assert.match(removed.message, /host h1 holds 2 iSCSI assignments \(\S+, \S+\) granted to its IQN: release them first, or give a new IQN/);

      // attach: the CHAP secret in a 0600 file, derived from the host's key for u1; no daemon.
      const attached = (await san.host(["attach", ...admin, "--host", "h1", "--assignment", a.id, "--state-dir", state, "--json"])).json as Record<string, unknown>;
      const secretFile = join(state, "keys", "u1.chap");
      assert.deepEqual(attached, { assignment: a.id, mode: "iscsi", uri: a.uri, chapUser: "h1", chapSecretFile: secretFile });
      // host list shows both iSCSI attachments: protocol, portal, target (issue 10 loose end); nothing runs here, so "attached".
      const listed = (await san.host(["list", "--state-dir", state, "--json"])).json as { items: Record<string, unknown>[] };
      const view = (id: string) => {
        const item = listed.items.find((i) => i["assignment"] === id);
        return item === undefined ? undefined : { protocol: item["protocol"], mode: item["mode"], alive: item["alive"], path: item["path"], uri: item["uri"], iscsi: item["iscsi"] };
      };
      assert.deepEqual(view(a.id), { protocol: "iscsi", mode: "iscsi", alive: true, path: a.uri, uri: a.uri, iscsi: { portal, target, lun: 0, chapUser: "h1", chapSecretFile: secretFile } });
      assert.deepEqual(view(plain.id), {
        protocol: "iscsi",
        mode: "iscsi",
        alive: true,
        path: plain.uri,
        uri: plain.uri,
        iscsi: { portal: u3Portal, target: iscsiTargetName("u3", plain.export), lun: 0, chapUser: null, chapSecretFile: null },
      });
      const human = await ipsan(["host", "list", "--state-dir", state]);
      assert.equal(human.code, 0, describeResult(human));
      assert.match(human.stdout, /^ASSIGNMENT +VOLUME +PROTOCOL +MODE +STATE +PORTAL +TARGET +PATH\n/);
      const row = human.stdout.split("\n").find((line) => line.startsWith(`${a.id} `));
      assert.deepEqual(row?.split(/ +/), [a.id, `u1/${a.export}`, "iscsi", "iscsi", "attached", portal, target, "lun", "0", a.uri], human.stdout);
      // detach forgets the record (the initiator logs out itself); list no longer shows it.
      await san.host(["detach", "--assignment", plain.id, "--state-dir", state, "--json"]);
      const afterDetach = (await san.host(["list", "--state-dir", state, "--json"])).json as { items: Record<string, unknown>[] };
      assert.deepEqual(afterDetach.items.map((i) => i["assignment"]), [a.id]);
      assert.equal(statSync(secretFile).mode & 0o777, 0o600);
      const key = (await client.hostKeys("h1")).find((k) => k.unit === "u1")?.key ?? "";
      const secret = chapSecret(Buffer.from(key, "hex"), "initiator");
      assert.equal(readFileSync(secretFile, "utf8"), secret);
      assert.equal(secret.length, 16, "Windows' initiator takes 12 to 16 characters");
      const text = await san.host(["attach", ...admin, "--host", "h1", "--assignment", a.id, "--mode", "iscsi", "--state-dir", state]);
      assert.match(text.result.stdout, new RegExp(`iscsiadm -m node -T ${target.replaceAll(".", "\\.")} -p ${portal.replaceAll(".", "\\.")} --login`));
      assert.match(text.result.stdout, /LIBISCSI_CHAP_PASSWORD="\$\(cat .*u1\.chap\)" iscsi-ls -i IQN/);
      assert.ok(!text.result.stdout.includes(secret), "the secret is never printed");
      // A rotated key: attach again writes the new secret.
      await client.rotateHostKey("h1");
      await san.host(["attach", ...admin, "--host", "h1", "--assignment", a.id, "--state-dir", state, "--json"]);
      const rotated = (await client.hostKeys("h1")).find((k) => k.unit === "u1")?.key ?? "";
      assert.notEqual(rotated, key);
      assert.equal(readFileSync(secretFile, "utf8"), chapSecret(Buffer.from(rotated, "hex"), "initiator"));
      const secretNow = readFileSync(secretFile, "utf8");
      failed(
        await ipsan(["host", "attach", ...admin, "--host", "h1", "--assignment", a.id, "--mode", "fuse", "--state-dir", state]),
        2,
        /--mode fuse: assignment \S+ is served over iSCSI.*use --mode iscsi/,
      );

      // Real initiators (libiscsi's tools, qemu) log in as IQN2 with the derived secret.
      const env = { LIBISCSI_CHAP_PASSWORD: secretNow };
      const ls = await run("iscsi-ls", ["-i", IQN2, "-s", `iscsi://h1@${portal}`], { timeoutMs: COMMAND_TIMEOUT_MS, env });
      assert.equal(ls.code, 0, describeResult(ls));
      assert.match(ls.stdout, new RegExp(`Target:${target.replaceAll(".", "\\.")} Portal:`));
      const inq = await run("iscsi-inq", ["-i", IQN2, `iscsi://h1@${portal}/${target}/0`], { timeoutMs: COMMAND_TIMEOUT_MS, env });
      assert.equal(inq.code, 0, describeResult(inq));
      const qemu = await run(
        "qemu-img",
        ["info", "--output=json", "--object", `secret,id=chap,file=${secretFile}`, "--image-opts", `driver=iscsi,transport=tcp,portal=${portal},target=${target},lun=0,user=h1,password-secret=chap,initiator-name=${IQN2}`],
        { timeoutMs: COMMAND_TIMEOUT_MS },
      );
      assert.equal(qemu.code, 0, describeResult(qemu));
      assert.equal((JSON.parse(qemu.stdout) as { "virtual-size": number })["virtual-size"], 16 * 1024 * 1024);
      // The old IQN, with the right secret, is refused (the canary, iscsi_station_canary_test.ts, proves this check can fail).
      await onlyTheGrantedInitiator({ portal, target, chapUser: "h1", secret: secretNow, granted: IQN2, other: IQN });

      // A station restart keeps the protocol, the host's IQN and the unit's portal.
      await station.child.stop("SIGTERM");
      await san.startStation({ dataDir: station.dataDir, discovery: station.discovery });
      const after = await san.client();
      const again = (await after.call("GET", `/api/v1/assignments/${a.id}`)) as Assignment;
      assert.equal(again.protocol, "iscsi");
      assert.deepEqual(again.iscsi, a.iscsi);
      assert.equal(again.uri, a.uri);
      assert.equal((await after.hosts()).find((h) => h.name === "h1")?.iqn, IQN2);
      assert.equal((await after.units()).find((u) => u.name === "u1")?.iscsi?.portal, portal);
    } finally {
      await san.close();
    }
  },
);
