// What this proves (issue 10 loose end): the socket read arenas of the
// target's connections (2 MiB each, src/nbd/large_reads.ts) are bounded by
// one named limit over all connections, IscsiLimits.readArenaBytesMax, and
// counted in the unit's GET /metrics:
// - N logged-in idle sessions reserve no arena (ipsan_unit_iscsi_read_arena_bytes 0);
// - when all N then write bulk data, only as many as the budget allows
//   (readArenaBytesMax / 4 MiB) read into arenas; the others read 64 KiB at a
//   time, and every byte lands (read back through another session);
// - a closed connection gives its reservation back, and the next bulk writer takes it.
// It also prints the unit's resident memory (VmRSS) before and after, for the record.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { READ_ARENA_RESERVATION_BYTES } from "../nbd/large_reads.ts";
import { controlRequest } from "../testing/control.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { waitFor } from "../testing/process.ts";
import { iscsiTargetName } from "./names.ts";
import { RawInitiator } from "./testing/initiator.ts";

const MIB = 1024 * 1024;
const SESSIONS = 32;
/** Room for two connections' arenas. */
const BUDGET_BYTES = 2 * READ_ARENA_RESERVATION_BYTES;
/** Each session's bulk write (blocks of 512 bytes). */
const WRITE_BYTES = 2 * MIB;

async function gauges(unit: RunningUnit): Promise<Record<string, number>> {
  const response = await controlRequest(unit, "GET", "/metrics");
  assert.equal(response.status, 200);
  const out: Record<string, number> = {};
  for (const line of String(response.body).split("\n")) {
    const match = /^(ipsan_unit_iscsi_[a-z_]+) ([0-9.e+]+)$/.exec(line);
    if (match !== null) out[match[1] ?? ""] = Number(match[2]);
  }
  return out;
}

function rssBytes(pid: number): number {
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(match?.[1] ?? Number.NaN) * 1024;
}

test(`${SESSIONS} sessions: idle ones reserve no read arena; bulk writers share a ${BUDGET_BYTES / MIB} MiB arena budget and their data lands`, { timeout: 120_000 }, async () => {
  const unit = await startUnit({
    name: "arenas",
    capacity: "256M",
    volumes: [{ name: "vol", size: "128M" }],
    control: true,
    extraArgs: ["--iscsi", "127.0.0.1:0"],
    env: { IPSAN_ISCSI_LIMITS: `readArenaBytesMax=${BUDGET_BYTES}` },
  });
  const sessions: RawInitiator[] = [];
  try {
    const portal = unit.iscsiPortal ?? "";
    const colon = portal.lastIndexOf(":");
    const target = iscsiTargetName("arenas", "vol");
    assert.deepEqual(await gauges(unit), {
      ipsan_unit_iscsi_connections: 0,
      ipsan_unit_iscsi_read_arena_bytes: 0,
      ipsan_unit_iscsi_read_arena_connections: 0,
      ipsan_unit_iscsi_read_arena_bytes_max: BUDGET_BYTES,
    });
    const rssBefore = rssBytes(unit.pid);
    for (let i = 0; i < SESSIONS; i += 1) {
      const session = await RawInitiator.connect(portal.slice(0, colon), Number(portal.slice(colon + 1)));
      sessions.push(session);
      assert.equal((await session.login({ targetName: target, initiatorName: `iqn.2026-12.org.ipsan.test:arena${i}` })).status, 0);
      await session.ready();
    }
    const idle = await gauges(unit);
    assert.equal(idle["ipsan_unit_iscsi_connections"], SESSIONS);
    assert.equal(idle["ipsan_unit_iscsi_read_arena_bytes"], 0, "idle sessions reserve no read arena");
    const rssIdle = rssBytes(unit.pid);

    // Every session writes its own 2 MiB at once (R2T, 64 KiB Data-Outs).
    const data = sessions.map(() => randomBytes(WRITE_BYTES));
    const lbaOf = (i: number): number => (i * WRITE_BYTES) / 512;
    const statuses = await Promise.all(sessions.map((session, i) => session.write10(lbaOf(i), data[i] ?? Buffer.alloc(0))));
    assert.deepEqual(statuses, sessions.map(() => 0));
    const rssAfter = rssBytes(unit.pid);
    process.stdout.write(
      `# unit VmRSS: ${(rssBefore / MIB).toFixed(1)} MiB before, ${(rssIdle / MIB).toFixed(1)} MiB with ${SESSIONS} idle sessions, ` +
        `${(rssAfter / MIB).toFixed(1)} MiB after each wrote ${WRITE_BYTES / MIB} MiB (arena budget ${BUDGET_BYTES / MIB} MiB)\n`,
    );
    const busy = await gauges(unit);
    assert.equal(busy["ipsan_unit_iscsi_read_arena_connections"], BUDGET_BYTES / READ_ARENA_RESERVATION_BYTES, "as many arena readers as the budget holds");
    assert.equal(busy["ipsan_unit_iscsi_read_arena_bytes"], BUDGET_BYTES, "arenas within the budget");

    // Every byte landed: read back through the last session (reads of 1 MiB: READ(10) counts blocks in 16 bits).
    const reader = sessions[SESSIONS - 1];
    assert.ok(reader !== undefined);
    for (let i = 0; i < SESSIONS; i += 1) {
      for (let half = 0; half < 2; half += 1) {
        const got: { status: number; data: Buffer } = await reader.read10(lbaOf(i) + half * 2048, 2048);
        assert.equal(got.status, 0);
        assert.ok(got.data.equals((data[i] ?? Buffer.alloc(0)).subarray(half * MIB, (half + 1) * MIB)), `session ${i}'s data, half ${half}`);
      }
    }

    // Closing every connection gives every reservation back; a new bulk writer takes one again.
    for (const session of sessions.splice(0)) session.close();
    await waitFor("the connections are gone", async () => ((await gauges(unit))["ipsan_unit_iscsi_connections"] === 0 ? true : undefined), { timeoutMs: 10_000 });
    assert.equal((await gauges(unit))["ipsan_unit_iscsi_read_arena_bytes"], 0);
    const again = await RawInitiator.connect(portal.slice(0, colon), Number(portal.slice(colon + 1)));
    sessions.push(again);
    assert.equal((await again.login({ targetName: target })).status, 0);
    await again.ready();
    assert.equal(await again.write10(0, randomBytes(WRITE_BYTES)), 0);
    assert.equal((await gauges(unit))["ipsan_unit_iscsi_read_arena_bytes"], READ_ARENA_RESERVATION_BYTES);
  } finally {
    for (const session of sessions) session.close();
    await unit.close();
  }
});
