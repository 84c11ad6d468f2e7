// Issue 9 item 15: long operations show progress on a terminal and stay
// quiet and machine-readable with --json or without a TTY. A real station and
// unit; `ipsan volume wipe` run under a real pseudo-terminal (script(1)), then
// with its output in pipes, then under the terminal with --json.

import assert from "node:assert/strict";
import { test } from "node:test";
import { describeResult, run } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";
import { describeAmount, describeElapsed, progressLine, taskProgress } from "./progress.ts";
import { logger } from "./log.ts";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { makeTempDir } from "../testing/tmp.ts";
import { waitFor } from "../testing/process.ts";
import { attach } from "../host/attach.ts";
import { HostState } from "../host/state.ts";
import type { Assignment } from "../host/station_client.ts";

/** A shell word. */
const quote = (word: string): string => `'${word.replace(/'/g, "'\\''")}'`;

/** Runs `ipsan ARGS` with stdout and stderr on a pseudo-terminal (script -q -e -c ... /dev/null); the terminal's bytes come back as stdout. */
function underTerminal(args: readonly string[]) {
  const command = [process.execPath, IPSAN_BIN, ...args].map(quote).join(" ");
  return run("script", ["-q", "-e", "-c", command, "/dev/null"], { timeoutMs: 120_000, env: { TERM: "xterm", COLUMNS: "200" } });
}

test("volume wipe: a progress line on a terminal; nothing but the output without one or with --json", { timeout: 240_000 }, async () => {
  const station = await startStation({});
  try {
    const unit = await startJoinedUnit(station, { name: "u1", capacity: "8G" });
    try {
      const admin = ["--station", station.url, "--token-file", `${station.dataDir}/admin.token`];
      const ipsan = (...args: string[]) => run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 120_000 });
      assert.equal((await ipsan("volume", "create", "u1", "w1", "6G", ...admin)).code, 0);

      const tty = await underTerminal(["volume", "wipe", "u1", "w1", ...admin]);
      assert.equal(tty.code, 0, describeResult(tty));
      // The line is rewritten in place (\r, then ESC [K), says the task, its state, percent and bytes, and the time.
      // (The wipe goes in chunks the task reports: 6G takes about a second, so the first poll sees it running.)
      const frames = tty.stdout.split("\r").filter((frame) => frame.startsWith("task "));
      assert.ok(frames.some((frame) => / volume\.wipe running /.test(frame)), JSON.stringify(tty.stdout));
      for (const frame of frames) assert.match(frame, /^task t-[0-9a-f]+ volume\.wipe (queued|running|succeeded)( [0-9]{1,3}% \([0-9.]+[KMGT]? of 6G\))? [0-9.]+s(m[0-9]{2}s)?\x1b\[K$/);
      // Ended once, with a newline, before the command's own output.
      assert.equal(frames.filter((frame) => / succeeded /.test(frame)).length, 1, JSON.stringify(tty.stdout));
      assert.match(tty.stdout, /\rtask t-[0-9a-f]+ volume\.wipe succeeded 100% \(6G of 6G\) [0-9.]+s\x1b\[K\r\nwiped volume u1\/w1 \(6G\)\r\n$/);

      // Pipes: the output alone, nothing on stderr.
      const piped = await ipsan("volume", "wipe", "u1", "w1", ...admin);
      assert.equal(piped.code, 0, describeResult(piped));
      assert.equal(piped.stdout, "wiped volume u1/w1 (6G)\n");
      assert.equal(piped.stderr, "");

      // A terminal with --json: only the JSON (the terminal turns \n into \r\n).
      const json = await underTerminal(["volume", "wipe", "u1", "w1", "--json", ...admin]);
      assert.equal(json.code, 0, describeResult(json));
      assert.doesNotMatch(json.stdout, /\x1b\[K|task t-/);
      assert.equal((JSON.parse(json.stdout.replace(/\r\n/g, "\n")) as { wipedBytes: number }).wipedBytes, 6 * 1024 ** 3);

      // ipsan tasks wait ID: follows a task to its end; exit 0 when it succeeded, the task as JSON.
      const taskId = /task (t-[0-9a-f]+) volume\.wipe/.exec(tty.stdout)?.[1] ?? "";
      const waited = await ipsan("tasks", "wait", taskId, "--json", ...admin);
      assert.equal(waited.code, 0, describeResult(waited));
      assert.deepEqual([JSON.parse(waited.stdout).id, JSON.parse(waited.stdout).state], [taskId, "succeeded"]);
      assert.equal(waited.stderr, "");
    } finally {
      await unit.close();
    }
  } finally {
    await station.close();
  }
});

test("progressLine: rewritten in place at most every PROGRESS_REFRESH_MS, ended once; silent without a TTY or with --json", () => {
  let now = 0;
  const written: string[] = [];
  const stream = { isTTY: true, write: (text: string) => written.push(text) } as unknown as NodeJS.WriteStream;
  const line = progressLine("detach /x:", { stream, now: () => now });
  line.update("waiting for nbdfuse (pid 7) to exit");
  now = 100;
  line.update("waiting for nbdfuse (pid 7) to exit"); // within the refresh interval: not written
  now = 1_500;
  line.update("copying", { done: 512, total: 1024, unit: "bytes" });
  line.end("done");
  line.update("after the end");
  assert.deepEqual(written, [
    "\rdetach /x: waiting for nbdfuse (pid 7) to exit 0.0s\x1b[K",
    "\rdetach /x: copying 50% (512 of 1K) 1.5s\x1b[K",
    "\rdetach /x: done 1.5s\x1b[K",
    "\n",
  ]);
  const silent: string[] = [];
  const pipe = { isTTY: false, write: (text: string) => silent.push(text) } as unknown as NodeJS.WriteStream;
  progressLine("x", { stream: pipe }).update("y");
  progressLine("x", { stream, json: true }).update("y");
  assert.deepEqual(silent, []);
  assert.equal(taskProgress({ stream: pipe }), undefined);
  assert.equal(taskProgress({ stream, json: true }), undefined);
  assert.equal(describeAmount({ done: 3, total: 5, unit: "steps" }), "3/5 steps");
  assert.equal(describeAmount(null), "");
  assert.equal(describeElapsed(185_000), "3m05s");
});

test("host detach: what it waits for on a terminal's progress line, ended once; nothing in pipes", { timeout: 90_000 }, async () => {
  const dir = makeTempDir("detach-progress");
  const socket = dir.file("nbd.sock");
  const server = spawn("nbdkit", ["--foreground", "--exit-with-parent", "-U", socket, "memory", "64M"], { stdio: "ignore" });
  try {
    await waitFor("nbdkit's socket", () => (existsSync(socket) ? true : undefined), { timeoutMs: 10_000 });
    const state = new HostState(dir.file("state"));
    const attachOne = async (id: string) => {
      const assignment: Assignment = { id, host: "h1", unit: "u1", nbdHost: "unix", nbdPort: 0, export: "", volume: "v1", sizeBytes: 64 * 1024 * 1024, uri: `nbd+unix:///?socket=${socket}` };
      return attach(state, { assignment, station: "http://127.0.0.1:1/", host: "h1", mode: "fuse" });
    };
    const first = await attachOne("a-tty");
    const tty = await underTerminal(["host", "detach", "--assignment", "a-tty", "--state-dir", state.dir]);
    assert.equal(tty.code, 0, describeResult(tty));
    const frames = tty.stdout.split("\r").filter((frame) => frame.startsWith("detach "));
    assert.match(frames[0] ?? "", new RegExp(`^detach ${first.path}: unmounting ${first.path} [0-9.]+s\\x1b\\[K$`));
    assert.equal(frames.filter((frame) => frame.includes(": done ")).length, 1, JSON.stringify(tty.stdout));
    assert.match(tty.stdout, /: done [0-9.]+s\x1b\[K\r\n/);
    assert.ok(tty.stdout.endsWith(`\r\ndetached ${first.path}\r\n`), JSON.stringify(tty.stdout));

    const second = await attachOne("a-pipe");
    const piped = await run(process.execPath, [IPSAN_BIN, "host", "detach", "--assignment", "a-pipe", "--state-dir", state.dir], { timeoutMs: 60_000 });
    assert.equal(piped.code, 0, describeResult(piped));
    assert.equal(piped.stdout, `detached ${second.path}\n`);
    assert.doesNotMatch(piped.stderr, /\r|\x1b\[K|unmounting/);
  } finally {
    server.kill("SIGTERM");
    dir.remove();
  }
});

test("a log line while the progress line shows gets a line of its own; the progress line is redrawn after it", () => {
  const written: string[] = [];
  const stderr = process.stderr;
  const originalWrite = stderr.write;
  const originalTty = Object.getOwnPropertyDescriptor(stderr, "isTTY");
  stderr.write = ((text: string | Uint8Array) => {
    written.push(String(text));
    return true;
  }) as typeof stderr.write;
  Object.defineProperty(stderr, "isTTY", { value: true, configurable: true });
  try {
    const line = progressLine("wipe:", { now: () => 0 });
    line.update("running");
    logger("progress-test").warn("something happened");
    line.end("done");
    logger("progress-test").warn("after the end");
  } finally {
    stderr.write = originalWrite;
    if (originalTty === undefined) delete (stderr as { isTTY?: boolean }).isTTY;
    else Object.defineProperty(stderr, "isTTY", originalTty);
  }
  const shown = written.map((text) => text.replace(/^[0-9T:.Z-]+ /, "TIME "));
  assert.deepEqual(shown, [
    "\rwipe: running 0.0s\x1b[K",
    "\r\x1b[K",
    "TIME WARN progress-test: something happened\n",
    "\rwipe: running 0.0s\x1b[K",
    "\rwipe: done 0.0s\x1b[K",
    "\n",
    "TIME WARN progress-test: after the end\n",
  ]);
});
