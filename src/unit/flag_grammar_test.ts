// Issue 9 item 2: one meaning per flag name (docs/cli.md). On `ipsan unit`,
// --discovery HOST:PORT is the station's UDP discovery address and
// --control-listen HOST:PORT where the unit opens its control API; --station
// means the station's HTTP API URL everywhere and --control URL a unit's
// control API URL. The old spellings still work on `ipsan unit` (--station
// HOST:PORT, --control HOST:PORT), each with a one-line deprecation note; a
// unit given the station's HTTP URL is refused at once (exit 2) naming
// --discovery, instead of joining nothing for ever. Real station, real units.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { describeResult, run, waitFor } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, startUnit, type RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "../station/harness.ts";

let station: RunningStation;
let tmp: TempDir;

before(async () => {
  station = await startStation();
  tmp = makeTempDir("flag-grammar");
});
after(async () => {
  await station?.close();
  tmp?.remove();
});

const discovery = (): string => `${station.discovery.host}:${station.discovery.port}`;

/** The unit's control line: it opened its control API where the flag said (127.0.0.3, not the --listen host it picks by itself). */
async function controlLine(unit: RunningUnit): Promise<string> {
  return waitFor("the control line", () => unit.stdoutLines().find((line) => line.includes(" control ")), { timeoutMs: 10_000 });
}

async function online(name: string): Promise<void> {
  await waitFor(
    `unit ${name} online`,
    async () => {
      const response = await station.api("GET", `/api/v1/units/${name}`);
      return response.status === 200 && (response.body as { state?: string }).state === "online" ? true : undefined;
    },
    { timeoutMs: 20_000 },
  );
}

test("the new spellings: --discovery HOST:PORT and --control-listen HOST:PORT join, with no deprecation note", { timeout: 60_000 }, async () => {
  const unit = await startUnit({
    name: "newflags",
    capacity: "64M",
    extraArgs: ["--discovery", discovery(), "--cluster-key-file", station.clusterKeyFile(), "--control-listen", "127.0.0.3:0", "--insecure-plaintext"],
  });
  try {
    await online("newflags");
    assert.match(await controlLine(unit), /^ipsan unit newflags control http:\/\/127\.0\.0\.3:[0-9]+$/);
    assert.doesNotMatch(unit.stderr(), /deprecated/);
  } finally {
    await unit.close();
  }
});

test("the old spellings still work: --station HOST:PORT and --control HOST:PORT, each with a one-line note", { timeout: 60_000 }, async () => {
  const unit = await startUnit({
    name: "oldflags",
    capacity: "64M",
    extraArgs: ["--station", discovery(), "--cluster-key-file", station.clusterKeyFile(), "--control", "127.0.0.3:0", "--insecure-plaintext"],
  });
  try {
    await online("oldflags");
    assert.match(await controlLine(unit), /^ipsan unit oldflags control http:\/\/127\.0\.0\.3:[0-9]+$/);
    const notes = unit.stderr().split("\n").filter((line) => line.includes("deprecated"));
    assert.deepEqual(notes, [
      `ipsan unit: --station HOST:PORT is deprecated; use --discovery ${discovery()} (--station now means the station's HTTP API URL, docs/cli.md)`,
      "ipsan unit: --control HOST:PORT is deprecated; use --control-listen 127.0.0.3:0 (--control URL names a unit's control API, docs/cli.md)",
    ]);
  } finally {
    await unit.close();
  }
});

test("the wrong kind of value is refused at once, exit 2, naming the right flag", { timeout: 60_000 }, async () => {
  const base = ["unit", "--data", tmp.path, "--capacity", "64M", "--listen", "127.0.0.1:0"];
  const key = ["--cluster-key-file", station.clusterKeyFile()];
  const cases: [string[], RegExp][] = [
    // The station's HTTP API given where the unit needs its discovery address: it used to hang, joining nothing.
    [[...base, "--station", station.url, ...key], /--station: "http:\/\/127\.0\.0\.1:[0-9]+" is a URL \(the station's HTTP API.*\); a unit joins through the station's UDP discovery address: --discovery HOST:PORT \(the station prints it at start: "ipsan station discovery udp:\/\/HOST:PORT"/],
    [[...base, "--discovery", station.url, ...key], /--discovery: "http:\/\/127\.0\.0\.1:[0-9]+" is a URL; a unit joins through the station's UDP discovery address, HOST:PORT/],
    [[...base, "--discovery", discovery(), "--station", discovery(), ...key], /--station HOST:PORT is the old spelling of --discovery HOST:PORT: give one of them/],
    [[...base, "--discovery", "nowhere", ...key], /--discovery: invalid address "nowhere"/],
    [[...base, "--control", "http://127.0.0.1:1"], /--control: "http:\/\/127\.0\.0\.1:1" is a URL; a unit opens its control API at --control-listen HOST:PORT .*"ipsan unit volume --control URL"/],
    [[...base, "--control-listen", "http://127.0.0.1:1"], /--control-listen: "http:\/\/127\.0\.0\.1:1" is a URL/],
    [[...base, "--control-listen", "127.0.0.1:0", "--control", "127.0.0.1:0"], /--control HOST:PORT is the old spelling of --control-listen HOST:PORT: give one of them/],
    [[...base, "--spare"], /--spare: only meaningful with --discovery HOST:PORT/],
  ];
  for (const [args, pattern] of cases) {
    const startedMs = Date.now();
    const result = await run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 20_000 });
    assert.equal(result.code, 2, `${args.join(" ")}: ${describeResult(result)}`);
    assert.match(result.stderr, pattern, args.join(" "));
    assert.ok(Date.now() - startedMs < 10_000, "refused at once");
  }
  // --help marks the old spellings as such.
  const help = await run(process.execPath, [IPSAN_BIN, "unit", "--help"], { timeoutMs: 20_000 });
  assert.match(help.stdout, /\n  --station VALUE   \(old spelling of --discovery HOST:PORT\)\n/);
  assert.match(help.stdout, /\n  --control VALUE   \(old spelling of --control-listen HOST:PORT\)\n/);
  // --control URL keeps its one meaning where a command talks to a unit: `ipsan unit volume --control URL`.
  const unit = await startUnit({ name: "standalone", capacity: "64M", control: true });
  try {
    const listed = await run(process.execPath, [IPSAN_BIN, "unit", "volume", "list", "--control", unit.controlUrl ?? "", "--token-file", `${unit.dataDir}/control.token`, "--json"], { timeoutMs: 20_000 });
    assert.equal(listed.code, 0, describeResult(listed));
    assert.deepEqual(JSON.parse(listed.stdout), { items: [] });
    const hostPort = await run(process.execPath, [IPSAN_BIN, "unit", "volume", "list", "--control", "127.0.0.1:1", "--token-file", `${unit.dataDir}/control.token`], { timeoutMs: 20_000 });
    assert.equal(hostPort.code, 2);
    assert.match(hostPort.stderr, /--control: invalid URL "127\.0\.0\.1:1" \(expected http:\/\/HOST:PORT\)/);
  } finally {
    await unit.close();
  }
});
