// What this proves: real initiators (libiscsi's iscsi-ls, iscsi-inq,
// iscsi-readcapacity16; qemu-img and qemu-io over qemu's iscsi driver) use a
// real `ipsan unit --iscsi 127.0.0.1:0`:
// - the unit prints `ipsan unit NAME iscsi iscsi://HOST:PORT`; GET /v1/info
//   says iscsi.portal, and each volume and partition says its target and NAA;
// - discovery (SendTargets=All) lists exactly the targets this initiator may
//   open: a volume granted to another address is hidden, and logging in to it
//   is refused (Authorization failure, 02-02); partitions are targets too;
// - VPD 0x83 carries the NAA the control API reports; READ CAPACITY(16) the size;
// - qemu-img convert/compare and qemu-io read what was written, with header
//   digests on too (qemu's header-digest=crc32c);
// - the same volume holds the same bytes over NBD and over iSCSI (not at once);
// - a session whose device is revoked (grant changed, volume deleted) is dropped at once;
// - SHA-256 CHAP (algorithm 7) with mutual CHAP from the raw initiator; a
//   reflected mutual challenge is refused (02-01);
// - CHAP: a standalone unit with --tls on and --tls-psk admits host1 with the
//   secret chapSecret(key, "initiator") (iscsi-inq, qemu-img), mutual CHAP
//   with chapSecret(key, "target"), refuses a wrong secret (Authentication
//   failure) and no CHAP at all (not admitted); with --tls require, a login
//   without CHAP is an authentication failure.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { controlOk } from "../testing/control.ts";
import { run, runOk } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { chapResponse, formatBinary } from "./chap.ts";
import { chapSecret, iscsiTargetName } from "./names.ts";
import { RawInitiator } from "./testing/initiator.ts";

const MIB = 1024 * 1024;
let unit: RunningUnit;
let dir: TempDir;

function url(target: string, credentials = ""): string {
  return `iscsi://${credentials}${unit.iscsiPortal}/${target}/0`;
}

before(async () => {
  dir = makeTempDir("iscsi-clients", memoryTmpBase());
  unit = await startUnit({
    name: "Rack_1",
    capacity: "256M",
    volumes: [
      { name: "vol1", size: "32M" },
      { name: "hidden", size: "16M" },
    ],
    control: true,
    extraArgs: ["--iscsi", "127.0.0.1:0"],
  });
  await controlOk(unit, "PUT", "/v1/volumes/hidden/grants", { hosts: ["10.9.9.9"] });
  await controlOk(unit, "PUT", "/v1/volumes/vol1/partitions", { sizesBytes: [4 * MIB, 4 * MIB] });
});

after(async () => {
  await unit?.close();
  dir?.remove();
});

interface IscsiView {
  target: string;
  naa: string;
}

test("contract line, /v1/info iscsi.portal, per-export target and NAA", async () => {
  assert.ok(unit.stdoutLines().includes(`ipsan unit Rack_1 iscsi iscsi://${unit.iscsiPortal}`), unit.stdoutLines().join("\n"));
  const info = (await controlOk(unit, "GET", "/v1/info")) as { iscsi: { portal: string }; volumes: { name: string; iscsi: IscsiView; partitions: { iscsi: IscsiView }[] }[] };
  assert.deepEqual(info.iscsi, { portal: unit.iscsiPortal });
  const vol1 = info.volumes.find((v) => v.name === "vol1")!;
  assert.equal(vol1.iscsi.target, "iqn.2026-12.org.ipsan:rack-1.vol1");
  assert.match(vol1.iscsi.naa, /^3[0-9a-f]{15}$/);
  assert.deepEqual(vol1.partitions.map((p) => p.iscsi.target), ["iqn.2026-12.org.ipsan:rack-1.vol1.p1", "iqn.2026-12.org.ipsan:rack-1.vol1.p2"]);
  assert.equal(new Set([vol1.iscsi.naa, ...vol1.partitions.map((p) => p.iscsi.naa)]).size, 3);
  // A newer volume whose name maps to the same target name: no target (null); the older keeps it.
  const twin = (await controlOk(unit, "POST", "/v1/volumes", { name: "VOL1", sizeBytes: MIB })) as { iscsi: IscsiView | null };
  assert.equal(twin.iscsi, null);
  const again = (await controlOk(unit, "GET", "/v1/volumes/vol1")) as { iscsi: IscsiView };
  assert.deepEqual(again.iscsi, vol1.iscsi);
  await controlOk(unit, "DELETE", "/v1/volumes/VOL1");
  assert.match(unit.stderr(), /two exports map to one iSCSI target name/);
});

test("iscsi-ls: discovery lists only this initiator's targets; the hidden one refuses the login", async () => {
  const listed = await runOk("iscsi-ls", [`iscsi://${unit.iscsiPortal}`], { timeoutMs: 20_000 });
  const targets = [...listed.stdout.matchAll(/Target:(\S+) Portal:(\S+)/g)].map((m) => m[1]).sort();
  assert.deepEqual(targets, ["iqn.2026-12.org.ipsan:rack-1.vol1", "iqn.2026-12.org.ipsan:rack-1.vol1.p1", "iqn.2026-12.org.ipsan:rack-1.vol1.p2"]);
  assert.match(listed.stdout, new RegExp(`Portal:${unit.iscsiPortal},1`));
  const refused = await run("iscsi-inq", [url(iscsiTargetName("Rack_1", "hidden"))], { timeoutMs: 20_000 });
  assert.notEqual(refused.code, 0);
  assert.match(refused.stdout + refused.stderr, /Authorization failure/);
  const unknown = await run("iscsi-inq", [url("iqn.2026-12.org.ipsan:rack-1.nosuch")], { timeoutMs: 20_000 });
  assert.notEqual(unknown.code, 0);
  assert.match(unknown.stdout + unknown.stderr, /not found|Target not found/i);
});

test("iscsi-inq VPD 0x83 shows the reported NAA; iscsi-readcapacity16 the size", async () => {
  const info = (await controlOk(unit, "GET", "/v1/volumes/vol1")) as { iscsi: IscsiView; partitions: { iscsi: IscsiView; sizeBytes: number }[] };
  const inq = await runOk("iscsi-inq", ["-e", "1", "-c", "131", url(info.iscsi.target)], { timeoutMs: 20_000 });
  assert.match(inq.stdout.toLowerCase(), new RegExp(info.iscsi.naa));
  const capacity = await runOk("iscsi-readcapacity16", [url(info.iscsi.target)], { timeoutMs: 20_000 });
  assert.match(capacity.stdout, new RegExp(`Total size:${32 * MIB}\\b`));
  const p2 = await runOk("iscsi-readcapacity16", [url(info.partitions[1]!.iscsi.target)], { timeoutMs: 20_000 });
  assert.match(p2.stdout, new RegExp(`Total size:${info.partitions[1]!.sizeBytes}\\b`));
});

test("qemu-img convert/compare and qemu-io over iscsi://, header digests too; the same bytes over NBD", async () => {
  const target = iscsiTargetName("Rack_1", "vol1");
  const source = join(dir.path, "random.img");
  writeFileSync(source, randomBytes(8 * MIB));
  await runOk("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, url(target)], { timeoutMs: 60_000 });
  // compare reads the first 8 MiB of the 32 MiB target (the rest must be zero: it is new).
  const compared = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, url(target)], { timeoutMs: 60_000 });
  assert.equal(compared.code, 0, compared.stdout + compared.stderr);
  const opts = `driver=iscsi,transport=tcp,portal=${unit.iscsiPortal},target=${target},lun=0,header-digest=crc32c`;
  await runOk("qemu-io", ["-c", "write -P 0x5a 9M 3M", "--image-opts", opts], { timeoutMs: 60_000 });
  const readBack = await runOk("qemu-io", ["-c", "read -P 0x5a 9M 3M", "--image-opts", opts], { timeoutMs: 60_000 });
  assert.match(readBack.stdout, /read 3145728\/3145728 bytes/);
  assert.doesNotMatch(readBack.stdout, /Pattern verification failed/);
  // NBD sees what iSCSI wrote (no iSCSI session is open now) ...
  const nbd = unit.uri("vol1");
  const overNbd = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, nbd], { timeoutMs: 60_000 });
  assert.match(overNbd.stdout + overNbd.stderr, /Content mismatch at offset 9437184|Images are identical/);
  const fromNbd = join(dir.path, "from-nbd.img");
  const fromIscsi = join(dir.path, "from-iscsi.img");
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", nbd, fromNbd], { timeoutMs: 60_000 });
  // ... and iSCSI sees what NBD writes.
  await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xc3 20M 1M", nbd], { timeoutMs: 60_000 });
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", url(target), fromIscsi], { timeoutMs: 60_000 });
  const a = readFileSync(fromNbd);
  const b = readFileSync(fromIscsi);
  assert.equal(a.length, 32 * MIB);
  assert.equal(b.length, 32 * MIB);
  assert.ok(a.subarray(0, 20 * MIB).equals(b.subarray(0, 20 * MIB)), "NBD and iSCSI disagree on the first 20 MiB");
  assert.ok(b.subarray(20 * MIB, 21 * MIB).equals(Buffer.alloc(MIB, 0xc3)), "iSCSI does not see NBD's write");
  assert.ok(a.subarray(0, 8 * MIB).equals(readFileSync(source)));
});

test("CHAP (MD5, mutual too) with the secret derived from the host's key; wrong or no CHAP refused; --tls require needs CHAP", async () => {
  const key = randomBytes(32);
  const pskFile = join(dir.path, "keys.psk");
  writeFileSync(pskFile, `host1:${key.toString("hex")}\n`);
  chmodSync(pskFile, 0o600);
  const secure = await startUnit({
    name: "secure",
    capacity: "128M",
    volumes: [{ name: "vol", size: "16M" }],
    allow: ["id:host1", "10.9.9.9/32"],
    extraArgs: ["--iscsi", "127.0.0.1:0", "--tls", "on", "--tls-psk", pskFile],
  });
  try {
    const target = iscsiTargetName("secure", "vol");
    const at = (credentials: string): string => `iscsi://${credentials}${secure.iscsiPortal}/${target}/0`;
    const secret = chapSecret(key, "initiator");
    const ok = await runOk("iscsi-inq", [at(`host1%${secret}@`)], { timeoutMs: 20_000 });
    assert.match(ok.stdout, /Peripheral Device Type:DIRECT_ACCESS/);
    const mutual = await runOk("iscsi-inq", [at(`host1%${secret}@`)], { timeoutMs: 20_000, env: { LIBISCSI_CHAP_TARGET_USERNAME: target, LIBISCSI_CHAP_TARGET_PASSWORD: chapSecret(key, "target") } });
    assert.match(mutual.stdout, /DIRECT_ACCESS/);
    const fakeTarget = await run("iscsi-inq", [at(`host1%${secret}@`)], { timeoutMs: 20_000, env: { LIBISCSI_CHAP_TARGET_USERNAME: target, LIBISCSI_CHAP_TARGET_PASSWORD: "not-the-target-1" } });
    assert.notEqual(fakeTarget.code, 0, "the initiator accepted a target answering with the wrong secret");
    const wrong = await run("iscsi-inq", [at("host1%wrongwrongwrong1@")], { timeoutMs: 20_000 });
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stdout + wrong.stderr, /Authentication failure/);
    const none = await run("iscsi-inq", [at("")], { timeoutMs: 20_000 });
    assert.notEqual(none.code, 0);
    assert.match(none.stdout + none.stderr, /Authorization failure/);
    const source = join(dir.path, "chap.img");
    writeFileSync(source, randomBytes(2 * MIB));
    await runOk("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, at(`host1%${secret}@`)], { timeoutMs: 60_000 });
    const compared = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, at(`host1%${secret}@`)], { timeoutMs: 60_000 });
    assert.equal(compared.code, 0, compared.stdout + compared.stderr);
    const discovered = await runOk("iscsi-ls", [`iscsi://host1%${secret}@${secure.iscsiPortal}`], { timeoutMs: 20_000 });
    assert.match(discovered.stdout, new RegExp(`Target:${target.replaceAll(".", "\\.")}`));
    // SHA-256 CHAP (algorithm 7) with mutual CHAP, from the raw initiator; a reflected challenge is refused.
    const portal = secure.iscsiPortal!;
    const [host, port] = [portal.slice(0, portal.lastIndexOf(":")), Number(portal.slice(portal.lastIndexOf(":") + 1))];
    const sha = await RawInitiator.connect(host, port);
    try {
      const challenge = randomBytes(32);
      const login = await sha.login({ targetName: target, chap: { user: "host1", secret, algorithm: 7, challenge } });
      assert.equal(login.status, 0);
      assert.equal(login.pairs.get("CHAP_R"), formatBinary(chapResponse(7, 9, chapSecret(key, "target"), challenge)));
      await sha.ready();
    } finally {
      sha.close();
    }
    const reflect = await RawInitiator.connect(host, port);
    try {
      const login = await reflect.login({ targetName: target, chap: { user: "host1", secret, challenge: "reflect" } });
      assert.equal(login.status, 0x0201);
    } finally {
      reflect.close();
    }
  } finally {
    await secure.close();
  }
  const strict = await startUnit({
    name: "strict",
    capacity: "128M",
    volumes: [{ name: "vol", size: "16M" }],
    allow: ["id:host1"],
    extraArgs: ["--iscsi", "127.0.0.1:0", "--tls", "require", "--tls-psk", pskFile],
  });
  try {
    const target = iscsiTargetName("strict", "vol");
    const none = await run("iscsi-inq", [`iscsi://${strict.iscsiPortal}/${target}/0`], { timeoutMs: 20_000 });
    assert.notEqual(none.code, 0);
    assert.match(none.stdout + none.stderr, /Authentication failure/);
    const ok = await runOk("iscsi-inq", [`iscsi://host1%${chapSecret(key, "initiator")}@${strict.iscsiPortal}/${target}/0`], { timeoutMs: 20_000 });
    assert.match(ok.stdout, /DIRECT_ACCESS/);
  } finally {
    await strict.close();
  }
});

test("a revoked device drops its session at once: grant changed, volume deleted", async () => {
  const [host, port] = [unit.iscsiPortal!.slice(0, unit.iscsiPortal!.lastIndexOf(":")), Number(unit.iscsiPortal!.slice(unit.iscsiPortal!.lastIndexOf(":") + 1))];
  for (const change of ["grant", "delete"] as const) {
    await controlOk(unit, "POST", "/v1/volumes", { name: `gone-${change}`, sizeBytes: 4 * MIB });
    const session = await RawInitiator.connect(host, port);
    try {
      const login = await session.login({ targetName: iscsiTargetName("Rack_1", `gone-${change}`) });
      assert.equal(login.status, 0);
      await session.ready();
      const started = Date.now();
      if (change === "grant") await controlOk(unit, "PUT", `/v1/volumes/gone-${change}/grants`, { hosts: ["10.9.9.9"] });
      else await controlOk(unit, "DELETE", `/v1/volumes/gone-${change}`);
      assert.ok(await session.waitClosed(2_000), `${change}: the session outlived its device`);
      assert.ok(Date.now() - started < 2_000);
    } finally {
      session.close();
    }
  }
  assert.match(unit.stderr(), /device revoked/);
});
