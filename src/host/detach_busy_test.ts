// Issue 9 item 1: `ipsan host detach` on a device still in use (ext4 on a loop
// over the nbdfuse file, or a program holding the file open) used to unmount
// lazily, kill nbdfuse and say "detached", leaving a broken mount. Now it
// refuses, names what holds the device and how to free it, and keeps the
// attachment working; only --force goes further. Real nbdkit, nbdfuse,
// losetup, mkfs.ext4 and mount.

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readlinkSync } from "node:fs";
import { test } from "node:test";
import { IpsanError } from "../util/errors.ts";
import { run, runOk, sleep } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { attach, attachmentAlive, detach, processAlive } from "./attach.ts";
import { HostState } from "./state.ts";
import type { Assignment } from "./station_client.ts";

async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timeout waiting for ${what}`);
    await sleep(50);
  }
}

async function refusal(promise: Promise<unknown>): Promise<IpsanError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof IpsanError, String(error));
    return error;
  }
  assert.fail("detach did not refuse");
}

test("detach refuses a busy attachment, names what holds it, keeps it working; --force detaches anyway", { timeout: 90_000 }, async () => {
  const dir = makeTempDir("detach-busy");
  const socket = dir.file("nbd.sock");
  const server = spawn("nbdkit", ["--foreground", "--exit-with-parent", "-U", socket, "memory", "64M"], { stdio: "ignore" });
  const state = new HostState(dir.file("state"));
  const mnt = dir.file("mnt");
  mkdirSync(mnt);
  let holder: ChildProcess | undefined;
  let loop: string | undefined;
  let mounted = false;
  try {
    await until("nbdkit socket", () => existsSync(socket));
    const assignment: Assignment = { id: "a-busy", host: "h1", unit: "u1", nbdHost: "unix", nbdPort: 0, export: "", volume: "v1", sizeBytes: 64 * 1024 * 1024, uri: `nbd+unix:///?socket=${socket}` };
    const record = await attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });

    // 1. A program holds the file open.
    holder = spawn("sh", ["-c", `exec 3<"${record.path}"; exec sleep 60`], { stdio: "ignore" });
    const holderPid = holder.pid ?? 0;
    await until("the holder opened the file", () => {
      try {
        return spawnSyncLinks(holderPid).includes(record.path);
      } catch {
        return false;
      }
    });
    const open = await refusal(detach(state, record));
    assert.equal(open.code, "CONFLICT");
    assert.match(open.message, new RegExp(`is busy: open in sleep \\(pid ${holderPid}\\)`));
    assert.match(open.message, /detach --force/);
    assert.equal(await attachmentAlive(record), true, "a refused detach leaves the attachment serving");
    assert.equal((await state.get("a-busy"))?.state, "attached");
    holder.kill("SIGKILL");
    await until("holder gone", () => !processAlive(holderPid));

    // 2. ext4 on a loop device over the file, mounted: refused by the library and by the CLI (exit 1, on stderr).
    loop = (await runOk("losetup", ["-f", "--show", record.path])).stdout.trim();
    await runOk("mkfs.ext4", ["-q", "-F", loop]);
    await runOk("mount", [loop, mnt]);
    mounted = true;
    const busy = await refusal(detach(state, record));
    assert.match(busy.message, new RegExp(`loop device ${loop} is backed by it and mounted on ${mnt} \\(umount, then losetup -d ${loop}\\)`));
    const cli = await run(process.execPath, [IPSAN_BIN, "host", "detach", "--assignment", "a-busy", "--state-dir", state.dir]);
    assert.equal(cli.code, 1, cli.stderr);
    assert.match(cli.stderr, /is busy: loop device/);
    assert.equal(await attachmentAlive(record), true);
    await runOk("umount", [mnt]);
    mounted = false;
    await runOk("losetup", ["-d", loop]);
    loop = undefined;

    // 3. Free again: detach works. Attach again, hold it open, and --force detaches anyway.
    await detach(state, record);
    assert.equal(await state.get("a-busy"), undefined);
    const again = await attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });
    holder = spawn("sh", ["-c", `exec 3<"${again.path}"; exec sleep 60`], { stdio: "ignore" });
    const againPid = holder.pid ?? 0;
    await until("the holder opened the file", () => spawnSyncLinks(againPid).includes(again.path));
    await detach(state, again, { force: true });
    assert.equal(await state.get("a-busy"), undefined);
    assert.equal(processAlive(again.pid ?? 0), false, "nbdfuse is gone after a forced detach");
  } finally {
    holder?.kill("SIGKILL");
    if (mounted) await run("umount", ["-l", mnt]);
    if (loop !== undefined) await run("losetup", ["-d", loop]);
    for (const r of await state.list().catch(() => [])) await detach(state, r, { force: true }).catch(() => undefined);
    server.kill("SIGTERM");
    dir.remove();
  }
});

/** Targets of /proc/PID/fd/* (what the process has open). */
function spawnSyncLinks(pid: number): string[] {
  return readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      return "";
    }
  });
}
