// Proves the `ipsan unit` command line against real bin/ipsan processes: bad
// flags and values exit 2 with a message naming the flag and the value (a
// smaller --capacity names both sizes); the ready line (and the control line
// after it) have the contract's format with the real bound port; SIGTERM
// exits 0; a second unit on the same data dir is refused; `--listen unix:`
// serves over a Unix socket; `ipsan unit volume ...` administers a stopped
// unit's table directly, refuses while a unit runs, and works through the
// control API with --control.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { run, waitFor } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, startUnit } from "../testing/unit.ts";

function ipsan(args: readonly string[], timeoutMs = 20_000) {
  return run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs });
}

test("bad flags and values: exit 2, message names the flag and the value", async () => {
  const dir = makeTempDir("cli-bad");
  const base = ["unit", "--data", dir.path, "--listen", "127.0.0.1:0"];
  const cases: [string[], RegExp[]][] = [
    [[...base, "--capacity", "12Q"], [/--capacity/, /12Q/]],
    [["unit", "--data", dir.path, "--capacity", "64M", "--listen", "nowhere"], [/--listen/, /nowhere/]],
    [["unit", "--data", dir.path, "--capacity", "64M", "--listen", "unix:"], [/--listen/, /unix:/]],
    [[...base, "--capacity", "64M", "--volume", "novolume"], [/--volume/, /novolume/]],
    [[...base, "--capacity", "64M", "--volume", "a:1000"], [/--volume/, /a:1000/]],
    [[...base, "--capacity", "64M", "--volume", "bad/name:1M"], [/--volume/, /bad\/name:1M/]],
    [[...base, "--capacity", "64M", "--volume", "a:1M", "--volume", "a:2M"], [/--volume/, /"a"/]],
    [[...base, "--capacity", "64M", "--allow", "10.0.0.0/33"], [/--allow/, /10\.0\.0\.0\/33/]],
    [[...base, "--capacity", "64M", "--name", "bad name"], [/--name/, /bad name/]],
    [[...base, "--capacity", "64M", "--control", "127.0.0.1:99999"], [/--control/, /127\.0\.0\.1:99999/]],
    [[...base, "--capacity", "64M", "--iscsi", "nowhere"], [/--iscsi/, /nowhere/]],
    [[...base, "--capacity", "64M", "--bogus"], [/--bogus/]],
    [[...base, "--capacity", "1M"], [/--capacity/, /1048576/]],
    [["unit", "--capacity", "64M", "--listen", "127.0.0.1:0"], [/--data/]],
    [["unit", "--data", dir.path, "--capacity", "64M"], [/--listen/]],
    [[...base, "--capacity", "64M", "--device", dir.file("missing-device")], [/--device/, /missing-device/]],
    [["unit", "volume", "create", "--data", dir.path, "x", "12Q"], [/SIZE/, /12Q/]],
    [["unit", "volume", "frobnicate"], [/frobnicate/]],
    [[...base, "--capacity", "64M", "--tls", "maybe"], [/--tls/, /maybe/]],
    [[...base, "--capacity", "64M", "--insecure-plaintext"], [/--insecure-plaintext/, /--discovery/]],
    [[...base, "--capacity", "64M", "--station", "127.0.0.1:9", "--cluster-key-file", dir.file("k"), "--insecure-plaintext", "--tls", "require"], [/--insecure-plaintext/, /--tls require/]],
    [[...base, "--capacity", "64M", "--allow", "id:h1"], [/--allow id:NAME/, /--tls-psk/]],
    [[...base, "--capacity", "64M", "--allow", "id:bad name"], [/--allow/, /id:bad name/]],
    [[...base, "--capacity", "64M", "--tls-psk", dir.file("keys.psk")], [/--tls-psk/, /--tls on/]],
    [[...base, "--capacity", "64M", "--tls", "on", "--tls-psk", dir.file("missing.psk")], [/--tls-psk/, /missing\.psk/]],
  ];
  try {
    for (const [args, patterns] of cases) {
      const result = await ipsan(args);
      assert.equal(result.code, 2, `${args.join(" ")}: exit ${result.code}\n${result.stderr}`);
      for (const pattern of patterns) assert.match(result.stderr, pattern, `${args.join(" ")}`);
      assert.ok(!/\n\s+at /.test(result.stderr), "no stack trace for a usage error");
    }
  } finally {
    dir.remove();
  }
});

test("ready line, control line, SIGTERM exits 0; capacity never shrinks; one unit per storage", async () => {
  const unit = await startUnit({ capacity: "64M", name: "clitest", volumes: [{ name: "a", size: "8M" }], control: true });
  try {
    const lines = unit.stdoutLines();
    assert.match(lines[0] ?? "", new RegExp(`^ipsan unit clitest ready nbd://127\\.0\\.0\\.1:${unit.port}$`));
    assert.ok(unit.port > 0);
    assert.match(lines[1] ?? "", /^ipsan unit clitest control http:\/\/127\.0\.0\.1:[1-9][0-9]*$/);
    await waitFor("the id line", () => (unit.stdoutLines().length >= 3 ? true : undefined), { timeoutMs: 5_000 });
    assert.match(unit.stdoutLines()[2] ?? "", /^ipsan unit clitest id [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    const second = await ipsan(["unit", "--data", unit.dataDir, "--capacity", "64M", "--listen", "127.0.0.1:0"]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, new RegExp(`locked: another unit \\(pid ${unit.pid}\\)`));
    const stopped = await unit.stop();
    assert.deepEqual([stopped.code, stopped.forced], [0, false]);
    assert.match(unit.stderr(), /stopped cleanly/);
    const smaller = await ipsan(["unit", "--data", unit.dataDir, "--capacity", "32M", "--listen", "127.0.0.1:0"]);
    assert.equal(smaller.code, 2);
    assert.match(smaller.stderr, /--capacity 33554432 is smaller than the existing storage .* \(67108864 bytes\)/);
  } finally {
    await unit.close();
  }
});

test("--listen unix:/PATH serves over a Unix socket", async () => {
  const dir = makeTempDir("cli-unix");
  const socket = dir.file("nbd.sock");
  const child = spawn(process.execPath, [IPSAN_BIN, "unit", "--data", dir.path, "--capacity", "32M", "--listen", `unix:${socket}`, "--volume", "u:4M", "--name", "ux"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  try {
    const line = await new Promise<string>((resolve, reject) => {
      let out = "";
      const timer = setTimeout(() => reject(new Error(`no ready line: ${out}`)), 20_000);
      child.stdout.setEncoding("utf8");
      child.stdout.on("data", (chunk: string) => {
        out += chunk;
        if (out.includes("\n")) {
          clearTimeout(timer);
          resolve(out.split("\n")[0] ?? "");
        }
      });
    });
    assert.equal(line, `ipsan unit ux ready nbd+unix:///?socket=${socket}`);
    const info = await run("nbdinfo", ["--size", `nbd+unix:///u?socket=${socket}`]);
    assert.equal(info.stdout.trim(), String(4 * 1024 * 1024), info.stderr);
  } finally {
    child.kill("SIGTERM");
    await new Promise((resolve) => child.once("exit", resolve));
    dir.remove();
  }
});

test("ipsan unit volume: offline on a stopped unit, refused while one runs, online with --control", async () => {
  const dir = makeTempDir("cli-admin");
  try {
    const data = ["--data", dir.path];
    const missing0 = await ipsan(["unit", "volume", "list", ...data]);
    assert.equal(missing0.code, 2);
    assert.match(missing0.stderr, /no unit storage/);
    const first = await startUnit({ dataDir: dir.path, capacity: "64M" });
    assert.equal((await first.stop()).code, 0);
    const created = await ipsan(["unit", "volume", "create", ...data, "v1", "8M"]);
    assert.equal(created.code, 0, created.stderr);
    assert.match(created.stdout, /^v1\t1\t8388608\t8M\t8192-24575\t-\t-$/m);
    assert.equal((await ipsan(["unit", "volume", "partition", ...data, "v1", "2M", "2M"])).code, 0);
    assert.equal((await ipsan(["unit", "volume", "grant", ...data, "v1", "10.0.0.0/8"])).code, 0);
    const listed = await ipsan(["unit", "volume", "list", ...data, "--json"]);
    const volumes = (JSON.parse(listed.stdout) as { items: { name: string; partitions: { name: string }[]; grants: string[] }[] }).items;
    assert.deepEqual(volumes.map((v) => [v.name, v.partitions.map((p) => p.name), v.grants]), [["v1", ["v1/p1", "v1/p2"], ["10.0.0.0/8"]]]);
    const duplicate = await ipsan(["unit", "volume", "create", ...data, "v1", "8M"]);
    assert.equal(duplicate.code, 1);
    assert.match(duplicate.stderr, /already exists/);

    const unit = await startUnit({ dataDir: dir.path, capacity: "64M", control: true });
    try {
      const refused = await ipsan(["unit", "volume", "list", ...data]);
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /locked.*--control/);
      const online = ["--control", unit.controlUrl ?? "", "--token-file", `${dir.path}/control.token`];
      const grown = await ipsan(["unit", "volume", "grow", ...online, "v1", "16M"]);
      assert.equal(grown.code, 0, grown.stderr);
      assert.match(grown.stdout, /^v1\t1\t16777216\t16M\t8192-40959\t/m);
      assert.equal((await ipsan(["unit", "volume", "delete", ...online, "v1"])).code, 0);
      const missing = await ipsan(["unit", "volume", "delete", ...online, "v1"]);
      assert.equal(missing.code, 1);
      assert.match(missing.stderr, /not found/);
    } finally {
      await unit.close();
    }
    const after = await ipsan(["unit", "volume", "list", ...data]);
    assert.equal(after.stdout.trim().split("\n").length, 1, "only the header: v1 was deleted through the running unit");
  } finally {
    dir.remove();
  }
});
