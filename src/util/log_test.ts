import assert from "node:assert/strict";
import { test } from "node:test";
import { readFileSync } from "node:fs";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { run } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { formatLine, logFormat, setLogFormat } from "./log.ts";

test("log lines start with an ISO 8601 time; the json format is one object per line with the fields", () => {
  const before = logFormat();
  try {
    setLogFormat("text");
    const text = formatLine("2026-12-03T09:00:00.000Z", "warn", "unit", "a message", { peer: "127.0.0.1:5", note: "two words", skipped: undefined });
    assert.equal(text, '2026-12-03T09:00:00.000Z WARN unit: a message peer=127.0.0.1:5 note="two words"\n');
    setLogFormat("json");
    const json = formatLine("2026-12-03T09:00:00.000Z", "info", "station", "ready", { port: 5, big: 2n ** 60n, msg: "not overwritten" });
    assert.ok(json.endsWith("\n") && !json.slice(0, -1).includes("\n"));
    assert.deepEqual(JSON.parse(json), { time: "2026-12-03T09:00:00.000Z", level: "info", component: "station", msg: "ready", port: 5, big: "1152921504606846976" });
  } finally {
    setLogFormat(before);
  }
});

test("ipsan --version prints the package's version; --log-format json makes a daemon's stderr JSON lines; a bad value exits 2", async () => {
  const version = (JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string }).version;
  const shown = await run(process.execPath, [IPSAN_BIN, "--version"]);
  assert.equal(shown.code, 0);
  assert.equal(shown.stdout, `ipsan ${version}\n`);

  const bad = await run(process.execPath, [IPSAN_BIN, "--log-format", "xml", "units"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--log-format: expected text or json, got "xml"/);

  // A unit started on new storage logs that it formatted it and is serving; the run's timeout stops it (SIGTERM: "stopping").
  const unitRun = async (formatArgs: readonly string[]) => {
    const dir = makeTempDir("log", memoryTmpBase());
    try {
      return await run(process.execPath, [IPSAN_BIN, "unit", ...formatArgs, "--name", "u1", "--data", dir.path, "--capacity", "64M", "--listen", "127.0.0.1:0"], { timeoutMs: 2500 });
    } finally {
      dir.remove();
    }
  };
  const text = await unitRun([]);
  const json = await unitRun(["--log-format=json"]);
  const logLines = (stderr: string): string[] => stderr.split("\n").filter((line) => /^\d{4}-\d\d-\d\dT|^\{/.test(line));
  for (const line of logLines(text.stderr)) assert.match(line, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARN|ERROR) [\w-]+: /);
  const records = logLines(json.stderr).map((line) => JSON.parse(line) as Record<string, unknown>);
  for (const record of records) {
    assert.equal(typeof record["time"], "string");
    assert.ok(["debug", "info", "warn", "error"].includes(record["level"] as string));
  }
  assert.ok(records.some((r) => r["component"] === "unit" && r["msg"] === "serving" && r["name"] === "u1"), json.stderr);
  assert.ok(logLines(text.stderr).some((line) => / INFO unit: serving name=u1 /.test(line)), text.stderr);
  assert.equal(logLines(text.stderr).length, records.length, `text:\n${text.stderr}\njson:\n${json.stderr}`);
});
