// Storage sharing (seed "Storage Sharing", Fig. 6): many hosts on one unit,
// each with exclusive volumes, enforced by the unit.
//
// On the default unit (NBD over TLS-PSK, `--tls require`): one unit joins a
// station; host A registers data-path address 127.0.0.2 and host B 127.0.0.3,
// and each asks for a volume (both land on the only unit; each request writes
// the host's key for the unit to its own state dir and answers an
// nbds://HOST@... URI with it). Our NBD client (src/nbd/client.ts, which speaks
// STARTTLS + TLS-PSK and binds a source address) shows: A opens its volume
// with its key, writes and flushes; B, with its own key, is refused on A's
// export (NBD_REP_ERR_POLICY) while A's connection stays open; A reads its
// bytes back on that same connection; B opens and writes its own volume
// without touching A's; A is refused on B's volume; a client with no key
// (nbdinfo, plaintext nbd://) and an identity the unit does not know are
// refused. After A's assignment is released (`ipsan host release`), A's key
// opens nothing there.
//
// The second test keeps the seed's address grants: its unit runs with
// --insecure-plaintext (it cannot tell hosts apart by key, so the station
// grants by source address and answers nbd:// URIs), and a raw NBD client
// (src/e2e/nbd_probe.ts) bound to each source address shows the same
// isolation by address.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import type { Assignment } from "../host/station_client.ts";
import { NbdClient, parseNbdUri } from "../nbd/client.ts";
import { run } from "../testing/process.ts";
import { San, type UnitOptions } from "./harness.ts";
import { openExport, type OpenResult } from "./nbd_probe.ts";

const MIB = 1024 * 1024;

/** Starts a station and one unit; returns `ipsan host request` for a host at an address, with its own state dir. */
async function startShared(san: San, unit: UnitOptions): Promise<{ request: (host: string, address: string) => Promise<Assignment>; common: string[] }> {
  const station = await san.startStation();
  await san.startUnit("u1", unit);
  await san.waitUnits(["u1"]);
  const common = ["--station", station.apiUrl, "--token-file", station.tokenFile];
  const request = async (host: string, address: string): Promise<Assignment> =>
    (
      await san.host([
        "request", ...common, "--host", host, "--address", address, "--size", "16M",
        "--state-dir", san.tmp.file(`state-${host}`), "--json",
      ])
    ).json as Assignment;
  return { request, common };
}

/** `target`'s export as `own`'s host would open it: its identity and key file (nbds:// URIs). */
function withIdentityOf(target: string, own: string): string {
  const url = new URL(target);
  const mine = new URL(own);
  url.username = mine.username;
  url.search = mine.search;
  return url.href;
}

/** Opens an nbds:// URI with our client, the TCP connection from `localAddress`. */
async function connectFrom(uri: string, localAddress: string): Promise<NbdClient> {
  const target = parseNbdUri(uri);
  if ("path" in target) throw new Error(`${uri}: not a TCP URI`);
  return NbdClient.connect({ ...target, localAddress }, { connectTimeoutMs: 10_000, requestTimeoutMs: 10_000 });
}

/** The connection must be refused on the export (past the TLS handshake: the key is good on this unit). */
async function refusedExport(attempt: Promise<NbdClient>, why: string): Promise<void> {
  await assert.rejects(attempt, (error: Error & { code?: string }) => {
    assert.equal(error.code, "PERMISSION_DENIED", `${why}: ${error.message}`);
    return true;
  });
}

test("sharing: two hosts on one TLS unit, each with its own key, each refused on the other's volume", { timeout: 90_000 }, async () => {
  const san = new San("sharing");
  const open: NbdClient[] = [];
  try {
    const { request, common } = await startShared(san, {});
    const a = await request("hostA", "127.0.0.2");
    const b = await request("hostB", "127.0.0.3");
    assert.equal(a.unit, "u1");
    assert.equal(b.unit, "u1");
    assert.notEqual(a.export, b.export);
    assert.equal(a.hostAddress, "127.0.0.2");
    assert.equal(b.hostAddress, "127.0.0.3");
    assert.match(a.uri, /^nbds:\/\/hostA@127\.0\.0\.1:\d+\/[^?]+\?tls-psk-file=/, a.uri);
    assert.match(b.uri, /^nbds:\/\/hostB@127\.0\.0\.1:\d+\/[^?]+\?tls-psk-file=/, b.uri);
    assert.notEqual(new URL(a.uri).searchParams.get("tls-psk-file"), new URL(b.uri).searchParams.get("tls-psk-file"), "each host its own key file");

    const aOnA = await connectFrom(a.uri, "127.0.0.2");
    open.push(aOnA);
    assert.equal(aOnA.sizeBytes, 16 * MIB, "host A opens its volume with its key");
    const patternA = randomBytes(64 * 1024);
    await aOnA.write(0, patternA, false);
    await aOnA.flush();

    await refusedExport(connectFrom(withIdentityOf(a.uri, b.uri), "127.0.0.3"), "host B (its own key) must be refused on host A's volume");
    assert.ok((await aOnA.read(0, patternA.length)).equals(patternA), "A still works, on the same connection");

    const bOnB = await connectFrom(b.uri, "127.0.0.3");
    open.push(bOnB);
    assert.equal(bOnB.sizeBytes, 16 * MIB, "host B opens its own volume");
    await bOnB.write(0, randomBytes(64 * 1024), false);
    await bOnB.flush();
    await bOnB.close();
    assert.ok((await aOnA.read(0, patternA.length)).equals(patternA), "B's writes did not touch A's volume");

    await refusedExport(connectFrom(withIdentityOf(b.uri, a.uri), "127.0.0.2"), "host A must be refused on host B's volume");

    // No key: plaintext is refused (the unit requires TLS); an identity the unit has no key for fails the handshake.
    const plain = new URL(a.uri);
    const nbdinfo = await run("nbdinfo", ["--size", `nbd://${plain.host}${plain.pathname}`], { timeoutMs: 15_000 });
    assert.notEqual(nbdinfo.code, 0, `nbdinfo without a key must fail on A's volume: ${nbdinfo.stdout}`);
    assert.match(nbdinfo.stderr, /TLS/, nbdinfo.stderr);
    const strangerKey = san.tmp.file("stranger.psk");
    writeFileSync(strangerKey, `stranger:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
    const stranger = new URL(a.uri);
    stranger.username = "stranger";
    stranger.searchParams.set("tls-psk-file", strangerKey);
    await assert.rejects(connectFrom(stranger.href, "127.0.0.1"), /handshake/, "an identity the unit does not know fails the TLS handshake");

    await aOnA.close();
    await san.host(["release", ...common, "--host", "hostA", "--assignment", String(a.id), "--state-dir", san.tmp.file("state-hostA")]);
    // The unit forgets the key of a host with no grant left there (or, holding it, refuses the export).
    await assert.rejects(connectFrom(a.uri, "127.0.0.2"), /handshake|refused/, "after release, host A's key opens nothing there");
  } finally {
    for (const client of open) client.destroy();
    await san.close();
  }
});

function openRaw(a: Assignment, localAddress: string): Promise<OpenResult> {
  return openExport({ host: a.nbdHost, port: a.nbdPort, localAddress, exportName: a.export });
}

test("sharing, address grants (--insecure-plaintext unit): a raw client bound to each host's address", { timeout: 90_000 }, async () => {
  const san = new San("sharing-plain");
  try {
    const { request, common } = await startShared(san, { extraArgs: ["--insecure-plaintext"] });
    const a = await request("hostA", "127.0.0.2");
    const b = await request("hostB", "127.0.0.3");
    assert.equal(a.unit, "u1");
    assert.equal(b.unit, "u1");
    assert.notEqual(a.export, b.export);
    assert.match(a.uri, /^nbd:\/\//, "a plaintext unit's URI");

    const aOnA = await openRaw(a, "127.0.0.2");
    assert.equal(aOnA.kind, "open", `host A opens its volume: ${JSON.stringify(aOnA)}`);
    if (aOnA.kind !== "open") return;
    assert.equal(aOnA.sizeBytes, 16 * MIB);
    const patternA = randomBytes(64 * 1024);
    await aOnA.client.write(0, patternA);
    await aOnA.client.flush();

    const bOnA = await openRaw(a, "127.0.0.3");
    assert.notEqual(bOnA.kind, "open", "host B must be refused on host A's volume");
    assert.ok((await aOnA.client.read(0, patternA.length)).equals(patternA), "A still works, on the same connection");

    const bOnB = await openRaw(b, "127.0.0.3");
    assert.equal(bOnB.kind, "open", `host B opens its own volume: ${JSON.stringify(bOnB)}`);
    if (bOnB.kind !== "open") return;
    await bOnB.client.write(0, randomBytes(64 * 1024));
    await bOnB.client.flush();
    bOnB.client.close();
    assert.ok((await aOnA.client.read(0, patternA.length)).equals(patternA), "B's writes did not touch A's volume");

    const aOnB = await openRaw(b, "127.0.0.2");
    assert.notEqual(aOnB.kind, "open", "host A must be refused on host B's volume");
    const strangerOnA = await openRaw(a, "127.0.0.1");
    assert.notEqual(strangerOnA.kind, "open", "an address with no grant is refused");
    const nbdinfo = await run("nbdinfo", ["--size", a.uri], { timeoutMs: 15_000 });
    assert.notEqual(nbdinfo.code, 0, `nbdinfo from 127.0.0.1 must fail on A's volume: ${nbdinfo.stdout}`);
    aOnA.client.close();

    await san.host(["release", ...common, "--host", "hostA", "--assignment", String(a.id), "--state-dir", san.tmp.file("state-hostA")]);
    const afterRelease = await openRaw(a, "127.0.0.2");
    assert.notEqual(afterRelease.kind, "open", "after release, host A's grant is revoked");
  } finally {
    await san.close();
  }
});
