// A simulation of the volume manager under random interleavings (issue 12):
// eight workers open exports as two peers, send requests (async and the
// synchronous fast paths), close devices, and change the table (create,
// delete, grow, partitions, grants, wipe) at random, over a real storage
// file whose every call is delayed by a seeded random amount, so changes and
// opens overlap in many orders. The invariant is checked independently of
// the manager's own rule (permits), at two kinds of moments:
// - every storage call a device makes, when it starts touching bytes and
//   when it ends: the bytes lie inside what the manager's CURRENT table gives
//   that device's export, and the table admits the device's peer;
// - every acknowledged change: each open, unrevoked device maps exactly
//   bytes the new table gives its export, to a peer the table admits.
// Some device storage calls fail at once (an injected EIO) while the other
// pieces of the same request are still delayed, as a fast ENOSPC would.
// A canary runs the same simulation against a copy of the compiled
// volumes.js whose opens no longer wait for a changing volume (the window
// the audit found) and must fail. A directed test pins the other defect:
// a split request settling on its first failed piece while another still
// runs; its canary (Promise.all put back) must fail too.

import assert from "node:assert/strict";
import { AsyncLocalStorage } from "node:async_hooks";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";
import type { BlockDevice, Peer } from "../block/types.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
import { seededRandom as prng } from "../util/random.ts";
import { setLogLevel } from "../util/log.ts";
import { parseCidr } from "./cidr.ts";
import { MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import type { VolumeTable } from "./table.ts";
import type { VolumeDevice } from "./volume_device.ts";
import { VolumeManager } from "./volumes.ts";

setLogLevel("error");

const SEEDS = 12;
const STEPS_PER_SEED = 500;
const WORKERS = 8;
const CANARY_SEEDS_MAX = 24;
/** Delay before a device's storage call touches bytes: long enough that one often outlasts a whole change. */
const DEVICE_DELAY_MS_MAX = 8;
/** Delay before the manager's own storage calls (zeroing, the table write). */
const MANAGER_DELAY_MS_MAX = 1;
/** A share of device calls is much slower (a busy disk's long tail), so one outlasts the table write's fdatasync. */
const DEVICE_SLOW_RATE = 0.1;
const DEVICE_SLOW_MS_MAX = 40;
/**
 * Seeds alternate between two profiles: calm (few failures, few changes) and
 * harsh (many storage calls fail at once, many changes), where a late piece
 * of a failed request meets a change often enough to be seen.
 */
const PROFILES = [
  { name: "calm", failureRate: 0.05, changeShare: 0.15 },
  { name: "harsh", failureRate: 0.4, changeShare: 0.35 },
] as const;
type Profile = (typeof PROFILES)[number];
const PEERS = ["10.0.0.1", "10.0.0.2"] as const;
const VOLUMES = ["a", "b", "c"] as const;
const EXPORTS = ["a", "a/p1", "a/p2", "b", "b/p1", "b/p2", "c"] as const;
/** Errors a request or change may meet in normal operation; anything else fails the run. */
const EXPECTED_CODES = new Set(["UNAVAILABLE", "PERMISSION_DENIED", "NOT_FOUND", "CONFLICT", "NO_SPACE", "INVALID_ARGUMENT", "SHUTTING_DOWN", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"]);

type Manager = VolumeManager;
interface ManagerClass {
  open(options: { dataDir: string; capacityBytes: number }): Promise<Manager>;
}


/** The error an injected storage failure throws (a stand-in for EIO or ENOSPC). */
class InjectedFailure extends Error {}

interface Tracked {
  readonly id: number;
  readonly device: BlockDevice;
  readonly exportName: string;
  readonly peer: Peer;
  closed: boolean;
}

/** The storage runs export `name` has in `table`, computed here from the table alone: [storageStart, length, deviceStart]. */
function exportRuns(table: VolumeTable, name: string): { storageStart: number; lengthBytes: number; deviceStart: number }[] | undefined {
  const [volumeName, partText] = name.split("/p");
  const volume = table.volumes.find((v) => v.name === volumeName);
  if (volume === undefined) return undefined;
  const whole: { storageStart: number; lengthBytes: number; deviceStart: number }[] = [];
  let device = 0;
  for (const extent of volume.extents) {
    const length = Math.min(extent.lengthLba * 512, volume.sizeBytes - device);
    if (length <= 0) break;
    whole.push({ storageStart: extent.startLba * 512, lengthBytes: length, deviceStart: device });
    device += length;
  }
  if (partText === undefined) return whole;
  const partition = volume.partitions[Number(partText) - 1];
  if (partition === undefined) return undefined;
  const start = partition.startLba * 512;
  const end = start + partition.lengthLba * 512;
  const out: { storageStart: number; lengthBytes: number; deviceStart: number }[] = [];
  for (const run of whole) {
    const from = Math.max(start, run.deviceStart);
    const to = Math.min(end, run.deviceStart + run.lengthBytes);
    if (from < to) out.push({ storageStart: run.storageStart + (from - run.deviceStart), lengthBytes: to - from, deviceStart: from - start });
  }
  return out;
}

function admitted(table: VolumeTable, name: string, peer: Peer): boolean {
  const volume = table.volumes.find((v) => v.name === name.split("/p")[0]);
  if (volume === undefined) return false;
  return volume.grants.length === 0 || volume.grants.includes(peer.address);
}

interface Run {
  readonly violations: string[];
  readonly unexpected: string[];
  readonly stats: { opens: number; requests: number; changes: number; revokedAtAck: number };
}

async function simulate(Manager: ManagerClass, seed: number, profile: Profile): Promise<Run> {
  const random = prng(seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;
  // On tmpfs the table write's fdatasync is instant, so a change can finish inside one slow storage call.
  const dir = makeTempDir("volume-model", memoryTmpBase());
  const manager = await Manager.open({ dataDir: dir.path, capacityBytes: 64 * MIB });
  const allow = PEERS.map((p) => parseCidr(`${p}/32`)).map((p) => (p.ok ? p.cidr : assert.fail("cidr")));
  const provider = new UnitExportProvider(manager, { allow });
  const context = new AsyncLocalStorage<Tracked>();
  const run: Run = { violations: [], unexpected: [], stats: { opens: 0, requests: 0, changes: 0, revokedAtAck: 0 } };
  const violation = (text: string): void => {
    if (run.violations.length < 20) run.violations.push(text);
  };

  // Every storage call of a device is checked against the table in force when it touches bytes.
  const check = (tracked: Tracked | undefined, position: number, length: number, when: string): void => {
    if (tracked === undefined || length <= 0) return;
    const table = manager.table;
    const runs = exportRuns(table, tracked.exportName);
    const inside = runs?.some((r) => position >= r.storageStart && position + length <= r.storageStart + r.lengthBytes) ?? false;
    if (!inside) violation(`device #${tracked.id} (${tracked.exportName} for ${tracked.peer.address}) touched storage ${position}+${length} ${when}: the table gives ${tracked.exportName} ${JSON.stringify(runs)}`);
    if (!admitted(table, tracked.exportName, tracked.peer)) violation(`device #${tracked.id} (${tracked.exportName}) of ${tracked.peer.address} touched storage ${when} but the table does not admit that peer`);
  };
  const storage = manager.storage as unknown as Record<string, (...args: unknown[]) => unknown>;
  const ranges: Record<string, (args: unknown[]) => [number, number]> = {
    read: (a) => [a[3] as number, a[2] as number],
    write: (a) => [a[3] as number, a[2] as number],
    writev: (a) => [a[2] as number, a[1] as number],
    zero: (a) => [a[0] as number, a[1] as number],
    discard: (a) => [a[0] as number, a[1] as number],
  };
  for (const [method, range] of Object.entries(ranges)) {
    const original = (storage[method] as (...args: unknown[]) => Promise<unknown>).bind(manager.storage);
    storage[method] = async (...args: unknown[]): Promise<unknown> => {
      if (context.getStore() !== undefined && random() < profile.failureRate) throw new InjectedFailure(`injected failure of ${method}`);
      const delayMax = context.getStore() === undefined ? MANAGER_DELAY_MS_MAX : random() < DEVICE_SLOW_RATE ? DEVICE_SLOW_MS_MAX : DEVICE_DELAY_MS_MAX;
      await new Promise((resolve) => setTimeout(resolve, Math.floor(random() * (delayMax + 1))));
      const tracked = context.getStore();
      const [position, length] = range(args);
      check(tracked, position, length, "at start");
      try {
        return await original(...args);
      } finally {
        check(tracked, position, length, "at end");
      }
    };
  }
  for (const [method, range] of [
    ["readNow", (a: unknown[]): [number, number] => [a[3] as number, a[2] as number]],
    ["writeNow", (a: unknown[]): [number, number] => [a[2] as number, a[1] as number]],
  ] as const) {
    const original = (storage[method] as (...args: unknown[]) => boolean).bind(manager.storage);
    storage[method] = (...args: unknown[]): boolean => {
      const [position, length] = range(args);
      check(context.getStore(), position, length, "synchronously");
      return original(...args);
    };
  }

  const devices: Tracked[] = [];
  let nextId = 1;
  const unexpected = (what: string, error: unknown): void => {
    if (error instanceof IpsanError && EXPECTED_CODES.has(error.code)) return;
    if (error instanceof InjectedFailure) return;
    if (run.unexpected.length < 20) run.unexpected.push(`${what}: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  };

  // After every acknowledged change: each open, unrevoked device maps only bytes the new table gives its export.
  const checkAck = (what: string): void => {
    const table = manager.table;
    for (const t of devices) {
      if (t.closed) continue;
      const device = t.device as VolumeDevice;
      if (device.revoked) {
        run.stats.revokedAtAck += 1;
        continue;
      }
      const runs = exportRuns(table, t.exportName);
      const ok =
        runs !== undefined &&
        admitted(table, t.exportName, t.peer) &&
        device.segments.every((s) =>
          runs.some(
            (r) =>
              s.deviceStart >= r.deviceStart &&
              s.deviceStart + s.lengthBytes <= r.deviceStart + r.lengthBytes &&
              s.storageStart === r.storageStart + (s.deviceStart - r.deviceStart),
          ),
        );
      if (!ok) violation(`after ${what} was acknowledged, device #${t.id} (${t.exportName} for ${t.peer.address}) is still open on ${JSON.stringify(device.segments)}; the table gives ${JSON.stringify(runs)}`);
    }
  };

  const change = async (): Promise<void> => {
    const name = pick(VOLUMES);
    const volume = manager.volume(name);
    const roll = random();
    let what: string;
    let promise: Promise<unknown>;
    if (volume === undefined || roll < 0.1) {
      what = `create ${name}`;
      promise = manager.create(name, (1 + Math.floor(random() * 4)) * MIB);
    } else if (roll < 0.3) {
      what = `delete ${name}`;
      promise = manager.delete(name);
    } else if (roll < 0.4) {
      what = `grow ${name}`;
      promise = manager.grow(name, volume.sizeBytes + MIB);
    } else if (roll < 0.65) {
      const parts = Math.floor(random() * 3);
      const sizes = Array.from({ length: parts }, () => (1 + Math.floor(random() * 4)) * 256 * 1024);
      what = `partition ${name} ${JSON.stringify(sizes)}`;
      promise = manager.setPartitions(name, sizes);
    } else if (roll < 0.95) {
      const hosts = PEERS.filter(() => random() < 0.5);
      what = `grant ${name} ${JSON.stringify(hosts)}`;
      promise = manager.setGrants(name, hosts);
    } else {
      what = `wipe ${name}`;
      promise = manager.wipe(name);
    }
    run.stats.changes += 1;
    try {
      await promise;
      checkAck(what);
    } catch (error) {
      unexpected(what, error);
    }
  };

  const open = async (): Promise<void> => {
    const exportName = pick(EXPORTS);
    const peer = { address: pick(PEERS), port: nextId };
    try {
      const device = await provider.open(exportName, peer);
      const tracked: Tracked = { id: nextId++, device, exportName, peer, closed: false };
      devices.push(tracked);
      // Like the NBD session, which drops a revoked connection: close it a moment later.
      device.onRevoked?.(() => {
        setTimeout(() => {
          if (tracked.closed) return;
          tracked.closed = true;
          void device.close();
        }, Math.floor(random() * DEVICE_DELAY_MS_MAX));
      });
      run.stats.opens += 1;
    } catch (error) {
      unexpected(`open ${exportName}`, error);
    }
  };

  const request = async (): Promise<void> => {
    const live = devices.filter((t) => !t.closed);
    if (live.length === 0) return open();
    const t = pick(live);
    const size = t.device.sizeBytes;
    const length = Math.min(size, (1 + Math.floor(random() * 2048)) * 512);
    const offset = Math.floor(random() * ((size - length) / 512 + 1)) * 512;
    const kind = pick(["read", "write", "writev", "zero", "trim", "readNow", "writeNow", "flush"] as const);
    run.stats.requests += 1;
    const data = Buffer.alloc(length, t.id & 0xff);
    await context.run(t, async () => {
      try {
        switch (kind) {
          case "read":
            return await t.device.read(Buffer.alloc(length), offset);
          case "write":
            return await t.device.write(data, offset, random() < 0.2);
          case "writev":
            return await t.device.writev?.([data.subarray(0, length >> 1), data.subarray(length >> 1)], offset, false);
          case "zero":
            return await t.device.zero(offset, length, { fua: false, mayTrim: random() < 0.5, fastOnly: false });
          case "trim":
            return await t.device.trim(offset, length, false);
          case "readNow":
            t.device.readNow?.(Buffer.alloc(length), offset);
            return;
          case "writeNow":
            t.device.writeNow?.([data], offset);
            return;
          case "flush":
            return await t.device.flush();
        }
      } catch (error) {
        unexpected(`${kind} on #${t.id} ${t.exportName}`, error);
      }
    });
  };

  const close = async (): Promise<void> => {
    const live = devices.filter((t) => !t.closed);
    if (live.length === 0) return;
    const t = pick(live);
    t.closed = true;
    await t.device.close();
  };

  try {
    // Interleaved creates and grows: every volume starts with two extents, so requests split into pieces.
    for (const name of VOLUMES) await manager.create(name, MIB);
    for (const name of VOLUMES) await manager.grow(name, 2 * MIB);
    let steps = 0;
    const worker = async (): Promise<void> => {
      while (steps < STEPS_PER_SEED) {
        steps += 1;
        const roll = random();
        if (roll < profile.changeShare) await change();
        else if (roll < profile.changeShare + 0.3) await open();
        else if (roll < 0.9) await request();
        else await close();
      }
    };
    await Promise.all(Array.from({ length: WORKERS }, worker));
    for (const t of devices) if (!t.closed) await t.device.close();
  } finally {
    await manager.close();
    dir.remove();
  }
  return run;
}

test(`volume manager: random opens, requests, changes and closes never leave a device outside the table (${SEEDS} seeds)`, async () => {
  const base = Number(process.env["IPSAN_MODEL_SEED"] ?? Math.floor(Math.random() * 1e9));
  const totals = { opens: 0, requests: 0, changes: 0, revokedAtAck: 0 };
  for (let i = 0; i < SEEDS; i++) {
    const seed = base + i;
    const profile = PROFILES[i % PROFILES.length] as Profile;
    const run = await simulate(VolumeManager, seed, profile);
    for (const key of Object.keys(totals) as (keyof typeof totals)[]) totals[key] += run.stats[key];
    assert.deepEqual(run.unexpected, [], `seed ${seed} ${profile.name} (IPSAN_MODEL_SEED=${base}): unexpected errors`);
    assert.deepEqual(run.violations, [], `seed ${seed} ${profile.name} (IPSAN_MODEL_SEED=${base}): invariant broken`);
  }
  // The simulation must really exercise revocation, or it proves nothing.
  assert.ok(totals.revokedAtAck > 0 && totals.opens > 100 && totals.changes > 100, `exercised: ${JSON.stringify(totals)}`);
  console.log(`model: ${JSON.stringify(totals)} (IPSAN_MODEL_SEED=${base})`);
});

/** A patched copy of a compiled module next to it: each [from, to] must match exactly once. */
function patchedCopy(file: string, tag: string, edits: readonly (readonly [string, string])[]): string {
  const here = dirname(fileURLToPath(import.meta.url));
  let text = readFileSync(join(here, file), "utf8");
  for (const [from, to] of edits) {
    assert.equal(text.split(from).length, 2, `the compiled ${file} has exactly one "${from}" (update the canary if the code moved)`);
    text = text.replace(from, to);
  }
  const copy = join(here, file.replace(/\.js$/, `_${tag}_${process.pid}.js`));
  writeFileSync(copy, text);
  return copy;
}

/** Runs the simulation on the broken manager until a seed shows a violation; returns it. */
async function canaryFinds(broken: ManagerClass, what: string): Promise<string> {
  const base = Math.floor(Math.random() * 1e9);
  for (let i = 0; i < CANARY_SEEDS_MAX; i++) {
    const run = await simulate(broken, base + i, PROFILES[i % PROFILES.length] as Profile);
    const found = run.violations[0];
    if (found !== undefined) return found;
  }
  return assert.fail(`the simulation did not notice ${what} in ${CANARY_SEEDS_MAX} seeds from ${base}`);
}

test("canary: the simulation finds the open window when opens stop waiting for a changing volume", async () => {
  const copy = patchedCopy("volumes.js", "canary_gate", [["const gate = this.#gates.get(parsed.volume);", "const gate = undefined;"]]);
  try {
    const broken = (await import(pathToFileURL(copy).href)) as { VolumeManager: ManagerClass };
    console.log(`canary caught: ${await canaryFinds(broken.VolumeManager, "opens racing changes")}`);
  } finally {
    rmSync(copy, { force: true });
  }
});

/**
 * A split request whose first piece fails at once and whose second piece is
 * slow: the request may fail, but the device must not look idle (and a delete
 * must not be acknowledged) before the slow piece has settled. Returns the
 * order in which the slow piece ended and the delete was acknowledged.
 */
async function lateFailedPiece(Manager: ManagerClass): Promise<string[]> {
  const dir = makeTempDir("volume-pieces", memoryTmpBase());
  const manager = await Manager.open({ dataDir: dir.path, capacityBytes: 16 * MIB });
  const events: string[] = [];
  try {
    await manager.create("a", MIB);
    await manager.create("b", MIB);
    await manager.grow("a", 2 * MIB); // a: two extents, so a read across 1 MiB is two pieces
    const device = await new UnitExportProvider(manager).open("a", { address: "127.0.0.1", port: 1 });
    const storage = manager.storage as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const original = (storage["read"] as (...args: unknown[]) => Promise<unknown>).bind(manager.storage);
    let calls = 0;
    storage["read"] = async (...args: unknown[]): Promise<unknown> => {
      calls += 1;
      if (calls === 1) throw new InjectedFailure("first piece fails at once");
      await new Promise((resolve) => setTimeout(resolve, 100));
      const result = await original(...args);
      events.push("slow piece settled");
      return result;
    };
    await assert.rejects(device.read(Buffer.alloc(MIB), MIB / 2), InjectedFailure);
    assert.equal(calls, 2, "the read was split into two pieces");
    await manager.delete("a");
    events.push("delete acknowledged");
    await device.close();
    await new Promise((resolve) => setTimeout(resolve, 150));
  } finally {
    await manager.close();
    dir.remove();
  }
  return events;
}

test("a split request that fails on one piece settles only when every piece has (the delete waits for the slow one)", async () => {
  assert.deepEqual(await lateFailedPiece(VolumeManager), ["slow piece settled", "delete acknowledged"]);
});

test("canary: with Promise.all for the pieces, the delete is acknowledged while a piece still runs", async () => {
  const device = patchedCopy("volume_device.js", "canary_pieces", [
    ["const results = await Promise.allSettled(pieces);", "const results = await Promise.all(pieces).then((values) => values.map((value) => ({ status: \"fulfilled\", value })));"],
  ]);
  const manager = patchedCopy("volumes.js", "canary_pieces", [["from \"./volume_device.js\";", `from "./${device.split("/").pop() ?? ""}";`]]);
  try {
    const broken = (await import(pathToFileURL(manager).href)) as { VolumeManager: ManagerClass };
    assert.deepEqual(await lateFailedPiece(broken.VolumeManager), ["delete acknowledged", "slow piece settled"]);
  } finally {
    rmSync(manager, { force: true });
    rmSync(device, { force: true });
  }
});
