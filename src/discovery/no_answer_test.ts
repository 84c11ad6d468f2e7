// Issue 9 item 2: a unit pointed at an address where no station answers (the
// station's HTTP port, a typo, a firewall) used to log "joining station" and
// then nothing, for ever. Now, after each round of unanswered STARTUPs, it
// warns, naming the address it tries and what --station must be. A real unit
// process; a UDP socket that receives its STARTUPs and never answers.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { writeFileSync } from "node:fs";
import { test } from "node:test";
import { waitFor } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";

test("a unit whose station never answers warns within seconds, naming the address and what --station must be", { timeout: 30_000 }, async () => {
  const silent = createSocket("udp4");
  let datagrams = 0;
  silent.on("message", () => (datagrams += 1));
  await new Promise<void>((resolve) => silent.bind(0, "127.0.0.1", resolve));
  const port = silent.address().port;
  const dir = makeTempDir("no-answer");
  const keyFile = dir.file("cluster.key");
  writeFileSync(keyFile, `${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  const unit = await startUnit({
    capacity: "64M",
    name: "u1",
    extraArgs: ["--station", `127.0.0.1:${port}`, "--cluster-key-file", keyFile, "--insecure-plaintext"],
    // The first STARTUP round (6 sends) then lasts about 50+100+200+400+800 ms.
    env: { IPSAN_DISCOVERY_RETRANSMIT_MS: "50" },
  });
  try {
    const startedMs = Date.now();
    const line = await waitFor("the no-answer warning", () => unit.stderr().split("\n").find((l) => l.includes("no answer from the station")), { timeoutMs: 15_000, intervalMs: 50 });
    assert.ok(Date.now() - startedMs < 10_000);
    assert.match(line, new RegExp(`WARN discovery: no answer from the station; still trying unit=u1 station=udp://127\\.0\\.0\\.1:${port} attempts=6`));
    assert.match(line, /ipsan station discovery udp:\/\/HOST:PORT/);
    assert.ok(datagrams >= 6, `the unit sent ${datagrams} datagrams`);
  } finally {
    await unit.close();
    silent.close();
    dir.remove();
  }
});
