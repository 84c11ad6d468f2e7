// What this proves: with the byte budgets at their smallest (one 1 MiB
// command in flight per connection and per unit), two initiators writing
// 1 MiB commands at queue depth 8 at once both finish, and every byte lands:
// commands over the budget wait (the connection stops reading) and are woken
// when bytes come back, from their own connection or another; nothing
// deadlocks and nothing is dropped.

import assert from "node:assert/strict";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { startUnit } from "../testing/unit.ts";
import { iscsiTargetName } from "./names.ts";

test("1 MiB budgets: two initiators at queue depth 8 both finish and their data lands", { timeout: 120_000 }, async () => {
  const MIB = 1024 * 1024;
  const unit = await startUnit({
    name: "budget",
    capacity: "256M",
    volumes: [
      { name: "a", size: "64M" },
      { name: "b", size: "64M" },
    ],
    extraArgs: ["--iscsi", "127.0.0.1:0"],
    env: { IPSAN_ISCSI_LIMITS: `transferBytesMax=${MIB},connectionBytesInFlightMax=${MIB},serverBytesInFlightMax=${MIB}` },
  });
  try {
    const url = (name: string): string => `iscsi://${unit.iscsiPortal}/${iscsiTargetName("budget", name)}/0`;
    const writers = await Promise.all(
      (["a", "b"] as const).map((name, i) => run("qemu-img", ["bench", "-f", "raw", "-w", "-c", "48", "-d", "8", "-s", "1M", `--pattern=${0x30 + i}`, url(name)], { timeoutMs: 90_000 })),
    );
    for (const writer of writers) assert.equal(writer.code, 0, writer.stdout + writer.stderr);
    for (const [i, name] of (["a", "b"] as const).entries()) {
      const check = await run("qemu-io", ["-f", "raw", "-c", `read -P ${0x30 + i} 0 48M`, url(name)], { timeoutMs: 60_000 });
      assert.equal(check.code, 0, check.stderr);
      assert.match(check.stdout, /read 50331648\/50331648 bytes/);
      assert.doesNotMatch(check.stdout, /Pattern verification failed/);
    }
  } finally {
    await unit.close();
  }
});
