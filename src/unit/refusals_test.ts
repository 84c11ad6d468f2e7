// A unit counts and logs every refused attempt (issue 6 section 4: a host
// fenced by a host failover that wakes up shows here), through its real NBD
// listener and control API: a peer that matches neither --allow nor any grant
// is refused at connect (`refused.connections`), a peer that holds a grant on
// one volume and opens another is refused at open (`refused.opens`); a peer
// whose grant is taken away while its connection is idle has the connection
// closed by the unit at once, and its next attempt is counted. Each refusal
// is logged, rate-limited per address. Over TLS, a PSK identity the unit has
// no key for (a host whose grants here were all revoked) is a refused
// connection too.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { NbdClient, parseNbdUri, type NbdTarget } from "../nbd/client.ts";
import { controlOk } from "../testing/control.ts";
import { waitFor } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";

/** The NBD target of `uri`, connected from `address` (the test speaks as that host). */
const from = (address: string, uri: string): NbdTarget => ({ ...parseNbdUri(uri), localAddress: address });

interface Refused {
  connections: number;
  opens: number;
}

test("refused connections and opens are counted in GET /v1/info and logged; a revoked idle connection is closed at once", { timeout: 60_000 }, async () => {
  const unit = await startUnit({ capacity: "64M", control: true, allow: ["127.0.0.1/32"], volumes: [{ name: "v1", size: "4M" }, { name: "v2", size: "4M" }] });
  try {
    const refused = async (): Promise<Refused> => ((await controlOk(unit, "GET", "/v1/info")) as { refused: Refused }).refused;
    assert.deepEqual(await refused(), { connections: 0, opens: 0 });
    await controlOk(unit, "PUT", "/v1/volumes/v1/grants", { hosts: ["127.0.0.3"] });

    // 127.0.0.2: not allowed, no grant anywhere: refused at connect.
    await assert.rejects(NbdClient.connect(from("127.0.0.2", unit.uri("v1")), { connectTimeoutMs: 3_000 }));
    assert.deepEqual(await refused(), { connections: 1, opens: 0 });
    // 127.0.0.3: granted v1, not v2: refused at open.
    // The client reads which peer was refused (NBD_REP_ERR_POLICY's message), not just "policy".
    await assert.rejects(NbdClient.connect(from("127.0.0.3", unit.uri("v2")), { connectTimeoutMs: 3_000 }), /export "v2" is not granted to peer 127\.0\.0\.3 \(no TLS identity\)/);
    assert.deepEqual(await refused(), { connections: 1, opens: 1 });

    // 127.0.0.3 holds v1 open and idle; the grant goes: the unit closes the connection without waiting for a request.
    const held = await NbdClient.connect(from("127.0.0.3", unit.uri("v1")));
    await held.write(0, Buffer.alloc(4096, 7), true);
    let brokenAtMs: number | undefined;
    held.onBroken(() => (brokenAtMs = Date.now()));
    const revokedAtMs = Date.now();
    await controlOk(unit, "PUT", "/v1/volumes/v1/grants", { hosts: [] });
    await waitFor("the idle connection closed by the unit", () => (brokenAtMs === undefined ? undefined : true), { timeoutMs: 2_000, intervalMs: 10 });
    assert.ok((brokenAtMs ?? Infinity) - revokedAtMs < 2_000);
    await held.close().catch(() => undefined);
    // It comes back: no grant left anywhere, so refused at connect, and counted.
    await assert.rejects(NbdClient.connect(from("127.0.0.3", unit.uri("v1")), { connectTimeoutMs: 3_000 }));
    assert.deepEqual(await refused(), { connections: 2, opens: 1 });

    const log = unit.stderr();
    assert.match(log, /connection refused: peer is not allowed and holds no grant peer=127\.0\.0\.2:/);
    assert.match(log, /open refused: export not granted to this peer peer=127\.0\.0\.3:\d+ export=v2/);
    assert.match(log, /export revoked: closing the connection peer=127\.0\.0\.3/);
  } finally {
    await unit.close();
  }
});

test("over TLS, a PSK identity the unit has no key for (a host fenced off all its volumes here) is counted as a refused connection", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("refusals-tls");
  const key = randomBytes(32);
  writeFileSync(dir.file("keys.psk"), `h1:${key.toString("hex")}\n`, { mode: 0o600 });
  const unit = await startUnit({ capacity: "64M", control: true, volumes: [{ name: "v1", size: "4M" }], extraArgs: ["--tls", "require", "--tls-psk", dir.file("keys.psk"), "--allow", "id:h1"] });
  try {
    const refused = async (): Promise<Refused> => ((await controlOk(unit, "GET", "/v1/info")) as { refused: Refused }).refused;
    const target = { ...parseNbdUri(unit.uri("v1")) };
    const known = await NbdClient.connect(target, { tls: { identity: "h1", key } });
    await known.close();
    assert.deepEqual(await refused(), { connections: 0, opens: 0 }, "a known identity is not a refusal");
    await assert.rejects(NbdClient.connect(target, { tls: { identity: "h2", key }, connectTimeoutMs: 3_000 }));
    assert.deepEqual(await refused(), { connections: 1, opens: 0 });
    assert.match(unit.stderr(), /TLS: unknown PSK identity .*identity=h2/);
  } finally {
    await unit.close();
    dir.remove();
  }
});
