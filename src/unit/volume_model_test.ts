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
// The canary runs the same simulation against a copy of the compiled
// volumes.js whose open no longer waits for a changing volume (the window
// the audit found): it must fail.

import assert from "node:assert/strict";
import { AsyncLocalStorage } from "node:async_hooks";
import { copyFileSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";
import type { BlockDevice, Peer } from "../block/types.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
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
const CANARY_SEEDS_MAX = 12;
const STORAGE_DELAY_MS_MAX = 3;
const PEERS = ["10.0.0.1", "10.0.0.2"] as const;
const VOLUMES = ["a", "b", "c"] as const;
const EXPORTS = ["a", "a/p1", "a/p2", "b", "b/p1", "b/p2", "c"] as const;
/** Errors a request or change may meet in normal operation; anything else fails the run. */
const EXPECTED_CODES = new Set(["UNAVAILABLE", "PERMISSION_DENIED", "NOT_FOUND", "CONFLICT", "NO_SPACE", "INVALID_ARGUMENT", "SHUTTING_DOWN", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"]);

type Manager = VolumeManager;
interface ManagerClass {
  open(options: { dataDir: string; capacityBytes: number }): Promise<Manager>;
}

/** mulberry32: a small seeded PRNG, so a failing seed replays. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

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

async function simulate(Manager: ManagerClass, seed: number): Promise<Run> {
  const random = prng(seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;
  const dir = makeTempDir("volume-model");
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
      await new Promise((resolve) => setTimeout(resolve, Math.floor(random() * (STORAGE_DELAY_MS_MAX + 1))));
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
      devices.push({ id: nextId++, device, exportName, peer, closed: false });
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
    const length = Math.min(size, (1 + Math.floor(random() * 512)) * 512);
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
    for (const name of VOLUMES) await manager.create(name, 2 * MIB);
    let steps = 0;
    const worker = async (): Promise<void> => {
      while (steps < STEPS_PER_SEED) {
        steps += 1;
        const roll = random();
        if (roll < 0.15) await change();
        else if (roll < 0.45) await open();
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
    const run = await simulate(VolumeManager, seed);
    for (const key of Object.keys(totals) as (keyof typeof totals)[]) totals[key] += run.stats[key];
    assert.deepEqual(run.unexpected, [], `seed ${seed} (IPSAN_MODEL_SEED=${base}): unexpected errors`);
    assert.deepEqual(run.violations, [], `seed ${seed} (IPSAN_MODEL_SEED=${base}): invariant broken`);
  }
  // The simulation must really exercise revocation, or it proves nothing.
  assert.ok(totals.revokedAtAck > 0 && totals.opens > 100 && totals.changes > 100, `exercised: ${JSON.stringify(totals)}`);
  console.log(`model: ${JSON.stringify(totals)} (IPSAN_MODEL_SEED=${base})`);
});

test("canary: the same simulation finds the open window when opens stop waiting for a changing volume", async () => {
  const here = dirname(fileURLToPath(import.meta.url));
  const source = join(here, "volumes.js");
  const canary = join(here, `volumes_canary_${process.pid}.js`);
  const gateWait = "const gate = this.#gates.get(parsed.volume);";
  const text = readFileSync(source, "utf8");
  assert.equal(text.split(gateWait).length, 2, `the compiled volumes.js has exactly one "${gateWait}" (update the canary if the gate moved)`);
  copyFileSync(source, canary);
  writeFileSync(canary, text.replace(gateWait, "const gate = undefined;"));
  try {
    const broken = (await import(pathToFileURL(canary).href)) as { VolumeManager: ManagerClass };
    const base = Math.floor(Math.random() * 1e9);
    let found: string | undefined;
    for (let i = 0; i < CANARY_SEEDS_MAX && found === undefined; i++) {
      const run = await simulate(broken.VolumeManager, base + i);
      found = run.violations[0];
    }
    assert.ok(found !== undefined, `the simulation did not notice opens racing changes in ${CANARY_SEEDS_MAX} seeds from ${base}`);
    console.log(`canary caught: ${found}`);
  } finally {
    rmSync(canary, { force: true });
  }
});
