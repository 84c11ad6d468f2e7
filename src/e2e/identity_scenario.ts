// The partitions part of the identity test (issue 7), apart so that its
// canary (identity_canary_test.ts) can run it against a broken station:
// volume shared1 on unit u1 is partitioned in two, p1 assigned to host hA and
// p2 to host hB (`POST /api/v1/assignments {partition}`); each attaches with
// --mode nbd and reads back what nbdcopy wrote through its nbds:// URI; each is
// refused on the whole volume and on the other's partition.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import type { Assignment } from "../host/station_client.ts";
import { nbdRead } from "../testing/clients.ts";
import { run, runOk } from "../testing/process.ts";
import type { San } from "./harness.ts";

export const MIB = 1024 * 1024;

/** `uri` with another TLS-PSK identity (the URI's user part) and key file. */
export function asIdentity(uri: string, identity: string, keyFile: string): string {
  const url = new URL(uri);
  url.username = identity;
  url.searchParams.set("tls-psk-file", keyFile);
  return url.href;
}

export async function refused(uri: string, why: string): Promise<void> {
  const result = await run("nbdinfo", ["--size", uri], { timeoutMs: 30_000 });
  assert.notEqual(result.code, 0, `${why}: nbdinfo must fail, got ${result.stdout}`);
}

export async function readsBack(uri: string, tmp: (name: string) => string, tag: string): Promise<void> {
  const pattern = randomBytes(MIB);
  writeFileSync(tmp(`${tag}.in`), pattern);
  // nbdcopy writes the file's 1 MiB at the start of the export (--destination-is-zero is not claimed).
  await runOk("nbdcopy", ["--flush", tmp(`${tag}.in`), uri], { timeoutMs: 30_000 });
  assert.ok((await nbdRead(uri, 0, MIB)).equals(pattern), `${tag}: the bytes nbdcopy wrote through ${uri} read back with nbdsh`);
}

/** p1 of a new volume to hA, p2 to hB; each works on its own and is refused elsewhere. `admin`: --station and --token-file. */
export async function partitionsToTwoHosts(san: San, admin: readonly string[]): Promise<void> {
  const client = await san.client();
  await client.registerHost("hA", "127.0.0.1");
  await client.registerHost("hB", "127.0.0.1");
  const carved = (await client.call("POST", "/api/v1/volumes", { unit: "u1", name: "shared1", sizeBytes: 32 * MIB })) as { unit: string; name: string };
  await client.call("PUT", `/api/v1/volumes/${carved.unit}/${carved.name}/partitions`, { sizesBytes: [8 * MIB, 8 * MIB] });
  const assignTo = async (host: string, partition: number): Promise<string> => {
    const assigned = (await client.call("POST", "/api/v1/assignments", { host, unit: "u1", volume: carved.name, partition })) as Assignment;
    const state = san.tmp.file(`${host}-state`);
    const local = (await san.host(["attach", ...admin, "--host", host, "--assignment", String(assigned.id), "--mode", "nbd", "--state-dir", state, "--json"])).json as { uri: string };
    return local.uri;
  };
  const pA = await assignTo("hA", 1);
  const pB = await assignTo("hB", 2);
  assert.match(pA, new RegExp(`/${carved.name}/p1\\?`));
  await readsBack(pA, (n) => san.tmp.file(n), "pA");
  await readsBack(pB, (n) => san.tmp.file(n), "pB");
  const whole = (uri: string): string => uri.replace(/\/p[12]\?/, "?");
  await refused(whole(pA), "hA on the whole volume");
  await refused(whole(pB), "hB on the whole volume");
  await refused(pA.replace("/p1?", "/p2?"), "hA on hB's partition");
  await refused(pB.replace("/p2?", "/p1?"), "hB on hA's partition");
}
