// Proves the host's attach machinery on its own, against a real NBD server
// (nbdkit's memory plugin on a Unix socket): attach starts nbdfuse detached,
// records it in the state dir and gives a file whose bytes are the export's
// (written with dd, read back with nbdsh straight from the server); attaching
// twice is idempotent; after nbdfuse is killed (what a host restart does) the
// attachment reads as dead and reattach() brings the same data back; detach
// unmounts, waits for nbdfuse to exit and removes the record. fuse on an
// nbds:// URI (nbdkit serving TLS-PSK) works with the key file. Also: records
// that are garbage are refused by the pure decoder, never half-trusted.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { isAbsolute, join, relative } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import { nbdsh } from "../testing/clients.ts";
import { runOk } from "../testing/process.ts";
import { attach, attachmentAlive, detach, isMounted, nbdfuseSource, processAlive, reattach } from "./attach.ts";
import { HostState, decodeRecord, recordKey } from "./state.ts";
import type { Assignment } from "./station_client.ts";

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timeout waiting for ${what}`);
    await sleep(50);
  }
}

test("attach/detach/reattach with nbdfuse against a real NBD server", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ipsan-attach-"));
  const socket = join(dir, "nbd.sock");
  const server = spawn("nbdkit", ["--foreground", "--exit-with-parent", "-U", socket, "memory", "16M"], { stdio: "ignore" });
  // A relative --state-dir (issue 9 item 9: list said "stale" while nbdfuse served, detach hung): resolved at start.
  const state = new HostState(relative(process.cwd(), join(dir, "state")));
  assert.ok(isAbsolute(state.dir));
  try {
    await until("nbdkit socket", () => existsSync(socket));
    const uri = `nbd+unix:///?socket=${socket}`;
    const assignment: Assignment = {
      id: "a-test/1",
      host: "h1",
      unit: "u1",
      nbdHost: "unix",
      nbdPort: 0,
      export: "",
      volume: "v1",
      sizeBytes: 16 * 1024 * 1024,
      uri,
    };
    const record = await attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });
    assert.equal(record.path, join(state.mountDir("a-test/1"), "nbd"));
    assert.ok(record.pid !== null && processAlive(record.pid));
    assert.equal(await attachmentAlive(record), true);
    assert.equal((await state.list()).length, 1);
    // The record key never lets an id escape the state dir.
    assert.equal(recordKey("a-test/1"), "a-test_1");

    execFileSync("dd", ["if=/dev/urandom", `of=${join(dir, "pattern")}`, "bs=64K", "count=4", "status=none"]);
    execFileSync("dd", [`if=${join(dir, "pattern")}`, `of=${record.path}`, "bs=64K", "seek=3", "conv=notrunc,fsync", "status=none"]);
    const fromServer = await runOk("nbdsh", [
      "-u", uri, "-c",
      "import sys, hashlib; print(hashlib.sha256(h.pread(256*1024, 3*64*1024)).hexdigest())",
    ]);
    assert.equal(fromServer.stdout.trim(), sha256(readFileSync(join(dir, "pattern"))), "bytes written through the nbdfuse file are on the server");

    const again = await attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });
    assert.equal(again.pid, record.pid, "attaching an attached assignment is idempotent");

    // A host restart kills nbdfuse: the record stays, the attachment is dead, reattach restores it.
    process.kill(record.pid ?? 0, "SIGKILL");
    await until("nbdfuse gone", () => !processAlive(record.pid ?? 0));
    assert.equal(await attachmentAlive(record), false);
    const fresh = await reattach(state, record);
    assert.notEqual(fresh.pid, record.pid);
    assert.equal(await attachmentAlive(fresh), true);
    const readBack = execFileSync("dd", [`if=${fresh.path}`, "bs=64K", "skip=3", "count=4", "status=none"]);
    assert.ok(readBack.equals(readFileSync(join(dir, "pattern"))), "re-attached file shows the same bytes");

    await detach(state, fresh);
    assert.equal(await isMounted(fresh.mountpoint ?? ""), false);
    assert.equal(processAlive(fresh.pid ?? 0), false, "nbdfuse exited after detach");
    assert.equal(existsSync(fresh.mountpoint ?? ""), false, "mount dir removed");
    assert.deepEqual(await state.list(), []);
  } finally {
    for (const r of await state.list().catch(() => [])) await detach(state, r).catch(() => undefined);
    server.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  }
});

test("attach reports nbdfuse's own error when the server is not there", { timeout: 30_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ipsan-attach-"));
  const state = new HostState(join(dir, "state"));
  try {
    const uri = `nbd+unix:///?socket=${join(dir, "missing.sock")}`;
    const assignment: Assignment = {
      id: "a-missing", host: "h1", unit: "u1", nbdHost: "unix", nbdPort: 0, export: "", volume: "v1", sizeBytes: 512, uri,
    };
    await assert.rejects(
      attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" }),
      (error: Error) => error.message.includes(uri) && /nbdfuse exited/.test(error.message),
    );
    assert.deepEqual(await state.list(), [], "no record of a failed attach");
    assert.equal(await isMounted(state.mountDir("a-missing")), false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A TCP port free on 127.0.0.1 right now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test("fuse on an nbds:// URI with a tls-psk-file: nbdfuse reaches a TLS-PSK server (through nbdkit -s nbd), the bytes are the server's", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ipsan-attach-tls-"));
  const pskFile = join(dir, "keys.psk");
  writeFileSync(pskFile, `h1:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  const port = await freePort();
  const server = spawn("nbdkit", ["--foreground", "--exit-with-parent", "--tls=require", `--tls-psk=${pskFile}`, "-i", "127.0.0.1", "-p", String(port), "memory", "16M"], { stdio: "ignore" });
  const state = new HostState(join(dir, "state"));
  try {
    const uri = `nbds://h1@127.0.0.1:${port}/?tls-psk-file=${pskFile}`;
    await until("nbdkit listening", () => {
      try {
        execFileSync("nbdinfo", ["--size", uri], { stdio: "ignore" });
        return true;
      } catch {
        return false;
      }
    });
    assert.deepEqual(nbdfuseSource(`nbd://127.0.0.1:${port}/v1`), [`nbd://127.0.0.1:${port}/v1`], "a plaintext URI goes to nbdfuse as it is");
    const assignment: Assignment = { id: "a-tls", host: "h1", unit: "u1", nbdHost: "127.0.0.1", nbdPort: port, export: "", volume: "v1", sizeBytes: 16 * 1024 * 1024, uri };
    const record = await attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });
    assert.equal(await attachmentAlive(record), true);
    execFileSync("dd", ["if=/dev/urandom", `of=${join(dir, "pattern")}`, "bs=64K", "count=4", "status=none"]);
    execFileSync("dd", [`if=${join(dir, "pattern")}`, `of=${record.path}`, "bs=64K", "seek=2", "conv=notrunc,fsync", "status=none"]);
    const fromServer = await nbdsh(uri, "import hashlib; print(hashlib.sha256(h.pread(256*1024, 2*64*1024)).hexdigest())");
    assert.equal(fromServer.stdout.trim(), sha256(readFileSync(join(dir, "pattern"))), "bytes written through the nbdfuse file are on the TLS server");
    await detach(state, record);
    assert.equal(processAlive(record.pid ?? 0), false, "nbdfuse exited after detach");
  } finally {
    for (const r of await state.list().catch(() => [])) await detach(state, r).catch(() => undefined);
    server.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  }
});

test("decodeRecord refuses garbage and names what is wrong", () => {
  const good = {
    version: 1, assignmentId: "a", station: "http://x/", host: "h", unit: "u", volume: "v", export: "v",
    uri: "nbd://127.0.0.1:1/v", sizeBytes: 512, mode: "fuse", path: "/p/nbd", pid: 12, mountpoint: "/p",
    device: null, state: "attached", attachedAt: "now",
  };
  assert.equal(decodeRecord(JSON.stringify(good)).kind, "record");
  const cases: Array<[unknown, string]> = [
    ["{", "not JSON"],
    [{ ...good, version: 2 }, "version=2"],
    [{ ...good, uri: 5 }, "uri"],
    [{ ...good, mode: "loop" }, "mode=loop"],
    [{ ...good, pid: -1 }, "pid=-1"],
    [{ ...good, state: "maybe" }, "state=maybe"],
    [{ ...good, mountpoint: 3 }, "mountpoint"],
    [null, "not an object"],
  ];
  for (const [input, reason] of cases) {
    const result = decodeRecord(typeof input === "string" ? input : JSON.stringify(input));
    assert.equal(result.kind, "invalid");
    assert.ok(result.kind === "invalid" && result.reason.includes(reason), `${JSON.stringify(input)} -> ${JSON.stringify(result)}`);
  }
});
