// NBD over TLS with pre-shared keys and access by host identity, per export
// (issue 7), with real clients against a real `ipsan unit --tls require`:
// volume "vol" is split into p1 and p2; p1 is granted to host h1, p2 to host
// h2, volume "solo" to h1 from 127.0.0.2 only (identity grants through the
// control API, as the station sends them). Proven here:
// - nbdinfo, nbdcopy, qemu-img (tls-creds-psk) and fio reach their export
//   through nbds://h1@.../vol/p1?tls-psk-file=...; each host reads and writes
//   only its own partition; neither opens the whole volume nor the other's;
// - refused: plaintext (NBD_REP_ERR_TLS_REQD), a wrong key, another host's
//   identity and key on this host's export, a client bound to the granted
//   `from` address without the key, and the right key from another address;
// - revoking the grant closes a live nbdsh connection at once;
// - garbage instead of a ClientHello, a client that STARTTLSes and stalls, and
//   a second STARTTLS over TLS never hurt the unit;
// - canary: a build whose grant check ignores the identity lets h2 open h1's
//   partition, and the refusal test notices.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import * as tls from "node:tls";
import { after, before, test } from "node:test";
import { NbdClient } from "../nbd/client.ts";
import { encodeOption } from "../nbd/peer_codec.ts";
import { NBD_OPT, NBD_REP } from "../nbd/protocol.ts";
import { PSK_CIPHERS } from "../nbd/tls.ts";
import { controlOk } from "../testing/control.ts";
import { fioTlsEnv } from "../testing/fio_tls.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { childEnv, run, runOk, sleep, waitFor } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";

const MIB = 1024 * 1024;
const PART_BYTES = 8 * MIB;
const HANDSHAKE_TIMEOUT_MS = 1500;
const K1 = randomBytes(32);
const K2 = randomBytes(32);

let tmp: TempDir;
let unit: RunningUnit;

function keyFile(name: string, identity: string, key: Buffer): string {
  const path = tmp.file(name);
  writeFileSync(path, `${identity}:${key.toString("hex")}\n`, { mode: 0o600 });
  return path;
}

function nbds(target: RunningUnit, identity: string, exportName: string, pskFile: string): string {
  return `nbds://${identity}@127.0.0.1:${target.port}/${exportName}?tls-psk-file=${pskFile}`;
}

let h1File: string;
let h2File: string;
let wrongFile: string;

/** The grants of the test layout (p1 to h1, p2 to h2, solo to h1 from 127.0.0.2). */
async function grantLayout(target: RunningUnit): Promise<void> {
  await controlOk(target, "PUT", "/v1/volumes/vol/partitions", { sizesBytes: [PART_BYTES, PART_BYTES] });
  await controlOk(target, "PUT", "/v1/volumes/vol/grants", {
    grants: [
      { host: "h1", key: K1.toString("hex"), export: "vol/p1" },
      { host: "h2", key: K2.toString("hex"), export: "vol/p2" },
    ],
  });
  await controlOk(target, "PUT", "/v1/volumes/solo/grants", { grants: [{ host: "h1", key: K1.toString("hex"), from: ["127.0.0.2"] }] });
}

function startTlsUnit(ipsanBin?: string): Promise<RunningUnit> {
  return startUnit({
    capacity: "64M",
    volumes: [
      { name: "vol", size: "32M" },
      { name: "solo", size: "4M" },
    ],
    control: true,
    extraArgs: ["--tls", "require"],
    env: { IPSAN_NBD_LIMITS: `handshakeTimeoutMs=${HANDSHAKE_TIMEOUT_MS}` },
    ...(ipsanBin === undefined ? {} : { ipsanBin }),
  });
}

before(async () => {
  tmp = makeTempDir("tls", memoryTmpBase());
  h1File = keyFile("h1.psk", "h1", K1);
  h2File = keyFile("h2.psk", "h2", K2);
  wrongFile = keyFile("wrong.psk", "h1", randomBytes(32));
  unit = await startTlsUnit();
  await grantLayout(unit);
});

after(async () => {
  await unit?.stop();
  tmp?.remove();
});

async function nbdinfoFails(uri: string): Promise<string> {
  const result = await run("nbdinfo", ["--size", uri], { timeoutMs: 30_000, env: { LIBNBD_DEBUG: "1" } });
  assert.notEqual(result.code, 0, `nbdinfo ${uri} must be refused:\n${result.stdout}`);
  return result.stderr;
}

test("nbdinfo over TLS-PSK: each host sees its own partition, TLS 1.3 negotiated, the key never in the answers", async () => {
  const info = JSON.parse((await runOk("nbdinfo", ["--json", nbds(unit, "h1", "vol/p1", h1File)])).stdout) as { TLS: boolean; exports: { "export-size": number }[] };
  assert.equal(info.TLS, true);
  assert.equal(info.exports[0]?.["export-size"], PART_BYTES);
  assert.equal(Number((await runOk("nbdinfo", ["--size", nbds(unit, "h2", "vol/p2", h2File)])).stdout.trim()), PART_BYTES);
  const volumes = (await controlOk(unit, "GET", "/v1/volumes")) as { volumes?: unknown[] } | unknown[];
  const text = JSON.stringify(volumes);
  assert.ok(!text.includes(K1.toString("hex")) && !text.includes(K2.toString("hex")), "no key in GET /v1/volumes");
  assert.match(text, /"access":\[\{"host":"h1","export":"vol\/p1","from":\[\]\},\{"host":"h2","export":"vol\/p2","from":\[\]\}\]/);
  const keys = readFileSync(`${unit.dataDir}/host-keys.psk`, "utf8");
  assert.equal(keys, `h1:${K1.toString("hex")}\nh2:${K2.toString("hex")}\n`);
  assert.ok(!unit.stderr().includes(K1.toString("hex")), "no key in the log");
});

test("refused: plaintext to a TLS-required unit, a wrong key, another host's identity and key, the whole volume, the other partition", async () => {
  const plaintext = await nbdinfoFails(unit.uri("vol/p1"));
  assert.match(plaintext, /TLS is required/);
  await nbdinfoFails(nbds(unit, "h1", "vol/p1", wrongFile));
  // h2 holds a real identity and key: TLS succeeds, the export is not granted to it.
  const other = await nbdinfoFails(nbds(unit, "h2", "vol/p1", h2File));
  assert.match(other, /not granted/);
  for (const [identity, file] of [["h1", h1File], ["h2", h2File]] as const) {
    await nbdinfoFails(nbds(unit, identity, "vol", file));
  }
  await nbdinfoFails(nbds(unit, "h1", "vol/p2", h1File));
});

test("nbdcopy writes each partition through its own host; qemu-img reads p1 back with tls-creds-psk; the other partition is untouched", async () => {
  const a = randomBytes(PART_BYTES);
  const b = randomBytes(PART_BYTES);
  writeFileSync(tmp.file("a.img"), a);
  writeFileSync(tmp.file("b.img"), b);
  await runOk("nbdcopy", [tmp.file("a.img"), nbds(unit, "h1", "vol/p1", h1File)]);
  await runOk("nbdcopy", [tmp.file("b.img"), nbds(unit, "h2", "vol/p2", h2File)]);
  await runOk("nbdcopy", [nbds(unit, "h2", "vol/p2", h2File), tmp.file("b.back")]);
  assert.ok(readFileSync(tmp.file("b.back")).equals(b), "p2 reads back what h2 wrote");
  // qemu reads keys.psk from the directory of its tls-creds-psk object.
  const qemuDir = tmp.file("qemu");
  await runOk("mkdir", ["-p", qemuDir]);
  writeFileSync(`${qemuDir}/keys.psk`, `h1:${K1.toString("hex")}\n`, { mode: 0o600 });
  const object = `tls-creds-psk,id=tls0,endpoint=client,dir=${qemuDir},username=h1`;
  const opts = `driver=nbd,host=127.0.0.1,port=${unit.port},export=vol/p1,tls-creds=tls0`;
  const info = await runOk("qemu-img", ["info", "--output=json", "--object", object, "--image-opts", opts]);
  assert.equal((JSON.parse(info.stdout) as { "virtual-size": number })["virtual-size"], PART_BYTES);
  await runOk("qemu-img", ["convert", "-O", "raw", "--object", object, "--image-opts", opts, tmp.file("a.back")]);
  assert.ok(readFileSync(tmp.file("a.back")).equals(a), "qemu-img reads p1 back as h1 wrote it");
});

test("fio through the nbds URI (libnbd allowed to read the tls-psk-file: fio_tls.ts): written and verified", async () => {
  const result = await run(
    "fio",
    [
      "--name=tls",
      "--ioengine=nbd",
      `--uri=${nbds(unit, "h1", "vol/p1", h1File)}`,
      "--rw=randwrite",
      "--bs=64k",
      "--size=4M",
      "--iodepth=8",
      "--verify=crc32c",
      "--do_verify=1",
    ],
    { timeoutMs: 60_000, env: await fioTlsEnv(tmp.path) },
  );
  assert.equal(result.code, 0, `fio: ${result.stdout}\n${result.stderr}`);
  // 64 writes of 64 KiB, then 64 reads that verify them (crc32c), no error.
  assert.match(result.stdout, /err= 0/);
  assert.match(result.stdout, /issued rwts: total=64,64,/);
});

test("our NBD client over TLS-PSK: from the granted address with the key opens; without the key, or from elsewhere, it does not", async () => {
  const target = { host: "127.0.0.1", port: unit.port, exportName: "solo", localAddress: "127.0.0.2" };
  const client = await NbdClient.connect(target, { tls: { identity: "h1", key: K1 } });
  try {
    const data = randomBytes(4096);
    await client.write(0, data, true);
    assert.ok((await client.read(0, 4096)).equals(data));
  } finally {
    await client.close();
  }
  // Bound to the granted address, no key: TLS is required.
  await assert.rejects(NbdClient.connect(target), /0x80000005|TLS/);
  // Wrong key, right address.
  await assert.rejects(NbdClient.connect(target, { tls: { identity: "h1", key: randomBytes(32) } }));
  // Right key, another address than `from`.
  await assert.rejects(NbdClient.connect({ ...target, localAddress: "127.0.0.3" }, { tls: { identity: "h1", key: K1 } }), /not granted/);
});

test("revoking a grant closes a live nbdsh connection at once", async () => {
  const script = [
    "import time, sys",
    "h.set_uri_allow_local_file(True)",
    `h.connect_uri("${nbds(unit, "h1", "vol/p1", h1File)}")`,
    "h.pread(512, 0)",
    "print('open', flush=True)",
    "deadline = time.monotonic() + 20",
    "while time.monotonic() < deadline:",
    "    try:",
    "        h.pread(512, 0)",
    "    except Exception as e:",
    "        print('closed', flush=True)",
    "        sys.exit(0)",
    "    time.sleep(0.02)",
    "print('still open', flush=True)",
  ].join("\n");
  const { spawn } = await import("node:child_process");
  const child = spawn("nbdsh", ["-c", script], { stdio: ["ignore", "pipe", "pipe"], env: childEnv() });
  let out = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  await waitFor("nbdsh connected", () => (out.includes("open") ? true : undefined), { timeoutMs: 20_000, intervalMs: 10 });
  const started = Date.now();
  await controlOk(unit, "PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h2", key: K2.toString("hex"), export: "vol/p2" }] });
  assert.equal(await exited, 0);
  const ms = Date.now() - started;
  assert.match(out, /closed/, `nbdsh: ${out}`);
  assert.ok(ms < 5_000, `closed ${ms} ms after the revoke`);
  await nbdinfoFails(nbds(unit, "h1", "vol/p1", h1File));
  // Back as it was for the other tests.
  await grantLayout(unit);
});

/** Greeting, client flags, NBD_OPT_STARTTLS; resolves with the raw socket once the ACK is read. */
async function startTlsRaw(port: number): Promise<net.Socket> {
  const socket = net.connect({ host: "127.0.0.1", port });
  socket.on("error", () => undefined);
  let received = Buffer.alloc(0);
  const need = async (bytes: number): Promise<void> => {
    await waitFor(`${bytes} bytes from the unit`, () => (received.length >= bytes ? true : undefined), { timeoutMs: 5_000, intervalMs: 10 });
  };
  const onData = (chunk: Buffer): void => {
    received = Buffer.concat([received, chunk]);
  };
  socket.on("data", onData);
  await need(18);
  socket.write(Buffer.from([0, 0, 0, 1]));
  socket.write(encodeOption(NBD_OPT.STARTTLS));
  await need(18 + 20);
  assert.equal(received.readUInt32BE(18 + 12), NBD_REP.ACK, "STARTTLS acknowledged");
  socket.off("data", onData);
  return socket;
}


function closed(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed) resolve();
    else socket.once("close", () => resolve());
  });
}

test("hostile: garbage instead of a ClientHello, STARTTLS then a stall, a second STARTTLS over TLS; the unit serves on", async () => {
  const garbage = await startTlsRaw(unit.port);
  garbage.write(randomBytes(4096));
  await closed(garbage);
  const stall = await startTlsRaw(unit.port);
  const stallStart = Date.now();
  await closed(stall);
  const stalledMs = Date.now() - stallStart;
  assert.ok(stalledMs >= HANDSHAKE_TIMEOUT_MS - 200 && stalledMs < HANDSHAKE_TIMEOUT_MS + 3_000, `stalled client dropped after ${stalledMs} ms`);
  const raw = await startTlsRaw(unit.port);
  const secure = tls.connect({ socket: raw, ciphers: PSK_CIPHERS, checkServerIdentity: () => undefined, pskCallback: () => ({ psk: K1, identity: "h1" }) });
  secure.on("error", () => undefined);
  await new Promise<void>((resolve, reject) => {
    secure.once("secureConnect", resolve);
    secure.once("close", () => reject(new Error("closed during the TLS handshake")));
  });
  assert.equal(secure.getProtocol(), "TLSv1.3");
  let reply = Buffer.alloc(0);
  secure.on("data", (chunk: Buffer) => (reply = Buffer.concat([reply, chunk])));
  secure.write(encodeOption(NBD_OPT.STARTTLS));
  await waitFor("the reply to a second STARTTLS", () => (reply.length >= 20 ? true : undefined), { timeoutMs: 5_000, intervalMs: 10 });
  assert.equal(reply.readUInt32BE(12), NBD_REP.ERR_INVALID);
  secure.destroy();
  assert.ok(unit.running());
  assert.equal(Number((await runOk("nbdinfo", ["--size", nbds(unit, "h1", "vol/p1", h1File)])).stdout.trim()), PART_BYTES);
});

test("canary: with the grant check ignoring the identity, h2 opens h1's partition (the refusal test would fail)", async () => {
  const build = patchedBuild("canary-tls-identity", [
    { file: "dist/unit/provider.js", from: "a.host === peer.identity &&\n                a.keyId === peer.keyId &&", to: "true &&" },
  ]);
  let canaryUnit: RunningUnit | undefined;
  try {
    canaryUnit = await startTlsUnit(build.ipsanBin);
    await grantLayout(canaryUnit);
    const result = await run("nbdinfo", ["--size", nbds(canaryUnit, "h2", "vol/p1", h2File)], { timeoutMs: 30_000 });
    assert.equal(result.code, 0, "the broken build admits another host's identity: the refusal test catches it");
  } finally {
    await canaryUnit?.stop();
    build.remove();
  }
});

test("a unit with --tls on still serves plaintext (with large reads) and TLS side by side", async () => {
  const pskFile = keyFile("standalone.psk", "h9", K1);
  const mixed = await startUnit({ capacity: "32M", volumes: [{ name: "v", size: "8M" }], extraArgs: ["--tls", "on", "--tls-psk", pskFile, "--allow", "127.0.0.0/8", "--allow", "id:h9"] });
  try {
    const data = randomBytes(4 * MIB);
    writeFileSync(tmp.file("m.img"), data);
    await runOk("nbdcopy", [tmp.file("m.img"), mixed.uri("v")]);
    await runOk("nbdcopy", [nbds(mixed, "h9", "v", pskFile), tmp.file("m.back")]);
    assert.ok(readFileSync(tmp.file("m.back")).subarray(0, data.length).equals(data));
  } finally {
    await mixed.stop();
  }
  await sleep(0);
});
