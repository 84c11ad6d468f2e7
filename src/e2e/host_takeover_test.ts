// The spare's side of a host failover on loopback, for a single copy and
// --takeover-mode fuse (the namespace proof, host_failover_test, covers a
// mirror in nbd mode): h1 (registered as 127.0.0.2, silent from the start)
// holds a volume; `ipsan host agent --spare --takeover-mode fuse` runs as the
// spare on 127.0.0.1. After --host-failover-after the station moves the volume
// to the spare and its agent mounts it with nbdfuse by itself (no record of
// it before), recorded like any attachment: bytes written into the file are
// on the unit. The unit speaks NBD over TLS (the default): the volume moves
// to the spare's identity, and nbdfuse reaches it with the spare's key
// (through `nbdkit -s nbd`, as nbdfuse cannot read a tls-psk-file itself). A bad --takeover-mode is refused naming the flag.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { IpsanChild } from "../demo/child.ts";
import type { Assignment } from "../host/station_client.ts";
import { nbdsh } from "../testing/clients.ts";
import { childEnv, runOk, waitFor } from "../testing/process.ts";
import { adminLocalUri } from "../testing/tls_uri.ts";
import { San, ipsan } from "./harness.ts";

const MIB = 1024 * 1024;

test("a spare's agent (--takeover-mode fuse) mounts a single copy moved to it and keeps it attached", { timeout: 90_000 }, async () => {
  const san = new San("takeover");
  let agent: IpsanChild | undefined;
  let heldId: string | undefined;
  const stateDir = san.tmp.file("spare-state");
  try {
    const station = await san.startStation({ extraArgs: ["--host-failover-after", "2s", "--host-offline-after-ms", "1500"] });
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const common = (host: string) => ["--station", station.apiUrl, "--token-file", station.tokenFile, "--host", host];

    const bad = await ipsan(["host", "agent", ...common("spare"), "--takeover-mode", "kernel"]);
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /--takeover-mode: invalid "kernel" \(expected nbd or fuse\)/);

    agent = new IpsanChild(["host", "agent", ...common("spare"), "--spare", "--takeover-mode", "fuse", "--address", "127.0.0.1", "--heartbeat-ms", "200", "--state-dir", stateDir], {
      name: "spare-agent",
      logFile: san.log("spare-agent"),
      env: childEnv(),
    });
    await agent.waitForLine(/^ipsan host agent spare running .*\(spare\)$/, 15_000);
    const client = await san.client();
    const spare = await waitFor(
      "the spare registered",
      async () => (await client.call("GET", "/api/v1/hosts/spare").catch(() => undefined)) as { spare: boolean; address: string } | undefined,
      { timeoutMs: 10_000, intervalMs: 100 },
    );
    assert.deepEqual([spare.spare, spare.address], [true, "127.0.0.1"]);

    const held = (await san.host(["request", ...common("h1"), "--address", "127.0.0.2", "--size", "16M", "--state-dir", san.tmp.file("h1-state"), "--json"])).json as Assignment;
    heldId = held.id;
    const moved = await waitFor(
      "the volume moved to the spare",
      async () => {
        const a = (await client.call("GET", `/api/v1/assignments/${held.id}`)) as Assignment & { movedAt: string | null };
        return a.host === "spare" && a.movedAt !== null ? a : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 100 },
    );
    assert.equal(moved.hostAddress, "127.0.0.1");
    const listed = await waitFor(
      "the spare's agent mounts it",
      async () => {
        const list = await ipsan(["host", "list", "--state-dir", stateDir, "--json"]);
        const items = (JSON.parse(list.stdout || "{}") as { items?: { assignment: string; mode: string; alive: boolean; path: string }[] }).items ?? [];
        return items.find((i) => i.assignment === held.id && i.alive);
      },
      { timeoutMs: 30_000, intervalMs: 200 },
    );
    assert.equal(listed.mode, "fuse");
    const pattern = randomBytes(MIB);
    writeFileSync(san.tmp.file("pattern"), pattern);
    await runOk("dd", [`if=${san.tmp.file("pattern")}`, `of=${listed.path}`, "bs=64K", "conv=notrunc,fsync", "status=none"]);
    // The unit's export read directly, as the spare (its identity and key, fetched with the admin token).
    assert.match(moved.uri ?? "", /^nbds:\/\/spare@/, "the moved volume is granted to the spare's identity");
    const direct = await nbdsh(await adminLocalUri(client, moved.uri ?? "", "u1", san.tmp.file("admin-keys")), `import hashlib; print(hashlib.sha256(h.pread(${MIB}, 0)).hexdigest())`);
    assert.equal(direct.stdout.trim(), createHash("sha256").update(pattern).digest("hex"), "bytes written into the spare's file are on the unit");
    assert.equal((await agent.stop("SIGTERM")).code, 0);
    agent = undefined;
    await san.host(["detach", "--assignment", held.id, "--state-dir", stateDir]);
    heldId = undefined;
  } finally {
    await agent?.stop("SIGKILL");
    if (heldId !== undefined) await ipsan(["host", "detach", "--assignment", heldId, "--state-dir", stateDir]);
    await san.close();
  }
});
