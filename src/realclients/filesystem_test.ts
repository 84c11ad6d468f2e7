// A real filesystem on an ipsan volume: nbdfuse turns the export into a file
// in a FUSE mount, losetup makes that file a block device, mkfs.ext4 formats
// it, and we write a tree of a few hundred files of mixed sizes (seeded data,
// sha256 of each). Then we tear EVERYTHING down (umount, losetup -d, unmount
// FUSE so nbdfuse disconnects): nothing of the data is left in any client
// cache. A fresh nbdfuse + loop device must pass `e2fsck -fn` clean, mount,
// and give back every file with the same checksum. Mounts, loop devices and
// FUSE are cleaned up in `finally` blocks even when an assertion fails.
// Run with IPSAN_REALCLIENTS_SERVER=nbdkit to check this test against nbdkit.

import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { SeededBytes, newSeed, sha256 } from "../testing/data.ts";
import { type Daemon, fileExists, startDaemon } from "../testing/daemon.ts";
import { describeResult, run, runOk, sleep } from "../testing/process.ts";
import { startTarget, type Target } from "../testing/target.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

const MIB = 1024 * 1024;
const VOLUME_BYTES = 160 * MIB;
const DIRECTORIES = 12;
const FILES_PER_DIRECTORY = 25;

let target: Target;
let tmp: TempDir;
before(async () => {
  tmp = makeTempDir("fs");
  target = await startTarget({ volumes: [{ name: "fs", sizeBytes: VOLUME_BYTES }] });
});
after(async () => {
  await target?.close();
  tmp?.remove();
});

/** The volume as a file in a FUSE mount, then as a loop device; `detach` undoes both. */
interface Attached {
  device: string;
  detach(): Promise<void>;
}

async function attach(uri: string, name: string): Promise<Attached> {
  const fuseDir = tmp.file(`fuse-${name}`);
  mkdirSync(fuseDir);
  const pidFile = tmp.file(`nbdfuse-${name}.pid`);
  const diskFile = join(fuseDir, "disk");
  let nbdfuse: Daemon;
  try {
    nbdfuse = await startDaemon("nbdfuse", ["-P", pidFile, diskFile, uri], { ready: fileExists(pidFile) });
  } catch (error) {
    // A dead nbdfuse can leave its mount behind ("transport endpoint is not connected").
    await run("fusermount3", ["-u", "-z", fuseDir], { timeoutMs: 10_000 });
    throw error;
  }
  let device: string | undefined;
  const detach = async (): Promise<void> => {
    if (device !== undefined) {
      const detached = await run("losetup", ["-d", device]);
      if (detached.code !== 0) process.stderr.write(`cleanup: ${describeResult(detached)}\n`);
      device = undefined;
    }
    // fusermount3 -u makes nbdfuse flush, disconnect and exit by itself.
    for (let attempt = 0; attempt < 20 && nbdfuse.running(); attempt++) {
      await run("fusermount3", ["-u", fuseDir], { timeoutMs: 10_000 });
      if (nbdfuse.running()) await sleep(100);
    }
    await nbdfuse.stop();
  };
  try {
    const result = await runOk("losetup", ["--find", "--show", diskFile]);
    device = result.stdout.trim();
    assert.match(device, /^\/dev\/loop\d+$/);
    return { device, detach };
  } catch (error) {
    await detach();
    throw error;
  }
}

async function withMount<T>(device: string, mountDir: string, body: () => Promise<T>): Promise<T> {
  await runOk("mount", ["-t", "ext4", device, mountDir]);
  try {
    return await body();
  } finally {
    let result = await run("umount", [mountDir], { timeoutMs: 30_000 });
    if (result.code !== 0) result = await run("umount", ["-l", mountDir]);
    if (result.code !== 0) process.stderr.write(`cleanup: ${describeResult(result)}\n`);
  }
}

/** Sizes: mostly small files, some medium, a few large ones; about 40 MiB in all. */
function fileSize(index: number, random: SeededBytes): number {
  const roll = random.next(4).readUInt32LE(0);
  if (index % 100 === 7) return 4 * MIB + (roll % 4096);
  if (index % 10 === 3) return 64 * 1024 + (roll % MIB);
  return roll % 20_000;
}

test("ext4 through nbdfuse + losetup: files survive umount, e2fsck -fn is clean, checksums match after remount", async () => {
  const uri = target.uri("fs");
  const seed = newSeed();
  process.stdout.write(`# seed ${seed}\n`);
  const mountDir = tmp.file("mnt");
  mkdirSync(mountDir);
  const expected = new Map<string, string>();

  const first = await attach(uri, "write");
  try {
    await runOk("mkfs.ext4", ["-q", "-F", "-L", "ipsan-test", first.device], { timeoutMs: 60_000 });
    await withMount(first.device, mountDir, async () => {
      const random = new SeededBytes(seed);
      let index = 0;
      for (let d = 0; d < DIRECTORIES; d++) {
        const directory = join(`dir${d}`, d % 3 === 0 ? "nested" : "");
        mkdirSync(join(mountDir, directory), { recursive: true });
        for (let f = 0; f < FILES_PER_DIRECTORY; f++, index++) {
          const data = random.next(fileSize(index, random));
          const relative = join(directory, `file${f}.bin`);
          writeFileSync(join(mountDir, relative), data);
          expected.set(relative, sha256(data));
        }
      }
    });
  } finally {
    await first.detach();
  }
  assert.equal(expected.size, DIRECTORIES * FILES_PER_DIRECTORY);

  const second = await attach(uri, "check");
  try {
    const fsck = await run("e2fsck", ["-f", "-n", second.device], { timeoutMs: 60_000 });
    assert.equal(fsck.code, 0, `e2fsck is not clean: ${describeResult(fsck)}`);
    await withMount(second.device, mountDir, async () => {
      const mismatched: string[] = [];
      for (const [relative, digest] of expected) {
        if (sha256(readFileSync(join(mountDir, relative))) !== digest) mismatched.push(relative);
      }
      assert.deepEqual(mismatched, [], `${mismatched.length} files differ after remount`);
    });
  } finally {
    await second.detach();
  }
});
