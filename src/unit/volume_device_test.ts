// Proves the BlockDevice semantics over a real sparse storage file and the
// volume manager's rules around open devices: trim and write-zeroes punch
// holes that read as zeroes and show as holes in extents (SEEK_DATA/HOLE),
// zero without mayTrim allocates zeroes, FUA and flush succeed; a grown volume
// shows its new size to new openings only; newly allocated space reads as
// zeroes even when a deleted volume left data there; deleting a volume or
// changing partitions or grants revokes open devices; access follows --allow
// and grants (IPv4-mapped peers included), and a joined unit serves volumes
// without grants to nobody; a second unit cannot open the same storage.

import { test } from "node:test";
import assert from "node:assert/strict";
import { makeTempDir } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
import { setLogLevel } from "../util/log.ts";
import { parseCidr } from "./cidr.ts";
import { MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { VolumeManager } from "./volumes.ts";

setLogLevel("warn");
const LOCAL = { address: "127.0.0.1", port: 1 };
const ZERO = { fua: false, mayTrim: true, fastOnly: false };

async function withUnit(body: (manager: VolumeManager, provider: UnitExportProvider) => Promise<void>): Promise<void> {
  const dir = makeTempDir("device");
  const manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 32 * MIB });
  try {
    await body(manager, new UnitExportProvider(manager));
  } finally {
    await manager.close();
    dir.remove();
  }
}

function code(expected: string) {
  return (error: unknown) => error instanceof IpsanError && error.code === expected;
}

test("trim, zero, extents, FUA and flush on a file-backed volume", async () => {
  await withUnit(async (manager, provider) => {
    await manager.create("a", 4 * MIB);
    const device = await provider.open("a", LOCAL);
    assert.equal(device.sizeBytes, 4 * MIB);
    assert.ok(device.capabilities.canMultiConn && device.capabilities.canFastZero && device.capabilities.canExtents);
    assert.deepEqual(await device.extents(0, 4 * MIB), [{ lengthBytes: 4 * MIB, hole: true, zero: true }]);
    await device.write(Buffer.alloc(MIB, 0x5a), MIB, true);
    await device.flush();
    const runs = await device.extents(0, 4 * MIB);
    assert.deepEqual(runs.map((r) => [r.lengthBytes, r.hole]), [[MIB, true], [MIB, false], [2 * MIB, true]]);
    await device.zero(MIB, 64 * 1024, ZERO);
    await device.trim(MIB + 512 * 1024, 512 * 1024, true);
    const back = Buffer.alloc(MIB);
    await device.read(back, MIB);
    assert.ok(back.subarray(0, 64 * 1024).every((b) => b === 0));
    assert.ok(back.subarray(64 * 1024, 512 * 1024).every((b) => b === 0x5a));
    assert.ok(back.subarray(512 * 1024).every((b) => b === 0));
    await device.zero(MIB + 128 * 1024, 4096, { fua: true, mayTrim: false, fastOnly: true });
    const small = Buffer.alloc(4096, 1);
    await device.read(small, MIB + 128 * 1024);
    assert.ok(small.every((b) => b === 0));
    await device.cache(0, 4 * MIB);
    await assert.rejects(device.cache(0, 4 * MIB + 1), code("OUT_OF_RANGE"));
    // A request across the end never touches the last bytes.
    await assert.rejects(device.write(Buffer.alloc(8192, 1), 4 * MIB - 4096, false), code("OUT_OF_RANGE"));
    const tail = Buffer.alloc(4096, 9);
    await device.read(tail, 4 * MIB - 4096);
    assert.ok(tail.every((b) => b === 0));
    await device.close();
    assert.equal(manager.openDeviceCount, 0);
  });
});

test("grow shows the new size to new openings only; new space reads as zeroes", async () => {
  await withUnit(async (manager, provider) => {
    await manager.create("a", 3 * MIB - 512);
    const old = await provider.open("a", LOCAL);
    await old.write(Buffer.alloc(3 * MIB - 512, 0xff), 0, false);
    // Fill and delete a neighbour so that a grow lands on dirty space.
    await manager.create("b", 2 * MIB);
    const b = await provider.open("b", LOCAL);
    await b.write(Buffer.alloc(2 * MIB, 0xee), 0, true);
    await b.close();
    await manager.delete("b");
    const grown = await manager.grow("a", 6 * MIB);
    assert.equal(grown.sizeBytes, 6 * MIB);
    assert.equal(old.sizeBytes, 3 * MIB - 512);
    await assert.rejects(old.read(Buffer.alloc(512), 3 * MIB - 512), code("OUT_OF_RANGE"));
    const fresh = await provider.open("a", LOCAL);
    assert.equal(fresh.sizeBytes, 6 * MIB);
    const all = Buffer.alloc(6 * MIB);
    await fresh.read(all, 0);
    assert.ok(all.subarray(0, 3 * MIB - 512).every((x) => x === 0xff));
    assert.ok(all.subarray(3 * MIB - 512).every((x) => x === 0), "grown space (old slack, the deleted neighbour's space) reads as zeroes");
    await old.close();
    await fresh.close();
  });
});

test("delete, repartition and grant changes revoke open devices", async () => {
  await withUnit(async (manager, provider) => {
    await manager.create("a", 4 * MIB);
    await manager.setPartitions("a", [MIB, MIB]);
    const whole = await provider.open("a", LOCAL);
    const p1 = await provider.open("a/p1", LOCAL);
    const p2 = await provider.open("a/p2", LOCAL);
    assert.equal(p2.sizeBytes, MIB);
    await assert.rejects(provider.open("a/p3", LOCAL), code("NOT_FOUND"));
    // A partition that grows in place keeps its open devices (like a grown volume).
    await manager.setPartitions("a", [MIB, 2 * MIB]);
    await p1.read(Buffer.alloc(512), 0);
    await p2.read(Buffer.alloc(512), 0);
    // p2 moves to other bytes: revoked; p1 grows: stays.
    await manager.setPartitions("a", [2 * MIB, MIB]);
    await assert.rejects(p2.read(Buffer.alloc(512), 0), code("UNAVAILABLE"));
    await p1.read(Buffer.alloc(512), 0);
    // p1 shrinks: it no longer holds the bytes it maps: revoked.
    await manager.setPartitions("a", [MIB / 2]);
    await assert.rejects(p1.read(Buffer.alloc(512), 0), code("UNAVAILABLE"));
    await whole.read(Buffer.alloc(512), 0);
    // Grant to another host: the loopback peer's open device is cut off.
    await manager.setGrants("a", ["10.9.9.9"]);
    await assert.rejects(whole.read(Buffer.alloc(512), 0), code("PERMISSION_DENIED"));
    await assert.rejects(provider.open("a", LOCAL), code("PERMISSION_DENIED"));
    const granted = await provider.open("a", { address: "::ffff:10.9.9.9", port: 2 });
    await manager.delete("a");
    await assert.rejects(granted.write(Buffer.alloc(512), 0, false), code("UNAVAILABLE"));
    await assert.rejects(provider.open("a", LOCAL), code("NOT_FOUND"));
    for (const device of [whole, p1, p2, granted]) await device.close();
  });
});

test("access: --allow, grants, joined units", async () => {
  await withUnit(async (manager) => {
    await manager.create("open", MIB);
    await manager.create("granted", MIB);
    await manager.setGrants("granted", ["10.1.0.0/16"]);
    const allow = [parseCidr("192.168.0.0/24"), parseCidr("127.0.0.0/8")].map((p) => (p.ok ? p.cidr : assert.fail()));
    let joined = false;
    const provider = new UnitExportProvider(manager, { allow, joined: () => joined });
    const names = (address: string) => provider.list({ address, port: 1 }).map((e) => e.name);
    assert.deepEqual(names("192.168.0.7"), ["open"]);
    assert.deepEqual(names("::ffff:192.168.0.7"), ["open"]);
    assert.deepEqual(names("10.1.2.3"), ["granted"]);
    assert.deepEqual(names("10.2.0.1"), []);
    assert.deepEqual(names("unix"), ["open"]);
    assert.equal(provider.admitsConnection({ address: "10.1.2.3", port: 1 }), true);
    assert.equal(provider.admitsConnection({ address: "10.2.0.1", port: 1 }), false);
    await assert.rejects(provider.open("open", { address: "10.1.2.3", port: 1 }), code("PERMISSION_DENIED"));
    joined = true;
    assert.deepEqual(names("192.168.0.7"), []);
    assert.deepEqual(names("10.1.2.3"), ["granted"]);
  });
});

test("a second unit cannot open the same storage while the first holds it", async () => {
  const dir = makeTempDir("lock");
  const first = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 16 * MIB });
  try {
    await assert.rejects(VolumeManager.open({ dataDir: dir.path, capacityBytes: 16 * MIB }), (error: unknown) => {
      return error instanceof IpsanError && error.code === "CONFLICT" && new RegExp(`pid ${process.pid}`).test(error.message);
    });
  } finally {
    await first.close();
  }
  const again = await VolumeManager.open({ dataDir: dir.path });
  await again.close();
  dir.remove();
});

test("capacity: grows, never shrinks; the error names both sizes", async () => {
  const dir = makeTempDir("capacity");
  try {
    let manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 16 * MIB });
    await manager.create("a", 8 * MIB);
    await manager.close();
    await assert.rejects(VolumeManager.open({ dataDir: dir.path, capacityBytes: 8 * MIB }), (error: unknown) => {
      return error instanceof IpsanError && error.field === "--capacity" && /8388608/.test(error.message) && /16777216/.test(error.message);
    });
    manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 64 * MIB });
    assert.equal(manager.snapshot().capacityBytes, 60 * MIB);
    assert.equal(manager.snapshot().freeBytes, 52 * MIB);
    await manager.create("b", 40 * MIB);
    assert.equal(manager.volume("a")?.sizeBytes, 8 * MIB);
    await manager.close();
  } finally {
    dir.remove();
  }
});

test("a wipe refuses opens while it runs, and waits for a closed device's last call instead of refusing", async () => {
  await withUnit(async (manager, provider) => {
    await manager.create("w", 4 * MIB);
    const storage = manager.storage as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const events: string[] = [];
    const zero = (storage["zero"] as (...args: unknown[]) => Promise<unknown>).bind(manager.storage);
    const read = (storage["read"] as (...args: unknown[]) => Promise<unknown>).bind(manager.storage);
    storage["zero"] = async (...args: unknown[]) => {
      await new Promise((resolve) => setTimeout(resolve, 100));
      return zero(...args);
    };
    storage["read"] = async (...args: unknown[]) => {
      await new Promise((resolve) => setTimeout(resolve, 100));
      const result = await read(...args);
      events.push("read settled");
      return result;
    };
    // A client closes its device while a read is still in flight: the wipe is not refused, it waits.
    const device = await provider.open("w", LOCAL);
    const reading = device.read(Buffer.alloc(4096), 0);
    await device.close();
    const wiping = manager.wipe("w").then(() => events.push("wiped"));
    await new Promise((resolve) => setTimeout(resolve, 20));
    await assert.rejects(provider.open("w", LOCAL), (error: unknown) => code("UNAVAILABLE")(error) && /being wiped/.test(String(error)));
    await Promise.all([reading, wiping]);
    assert.deepEqual(events, ["read settled", "wiped"]);
    const after = await provider.open("w", LOCAL);
    await after.close();
  });
});
