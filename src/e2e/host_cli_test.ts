// `ipsan host` against a real station with an empty pool: what a user sees
// when things are wrong. Bad flags exit 2 naming the flag and the value; a
// missing token file is named; a request the pool cannot hold exits 1 with
// the station's NO_SPACE reason; a wrong token gets the station's 401. And the
// agent: without --address it registers the address its connections come from,
// heartbeats keep the host online, a host registered with --address keeps it
// when an agent without --address starts, and SIGTERM stops it with status 0.

import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { IpsanChild } from "../demo/child.ts";
import { childEnv, describeResult, waitFor } from "../testing/process.ts";
import { San, ipsan } from "./harness.ts";

test("ipsan host: clear errors, and the agent keeps a host online", { timeout: 60_000 }, async () => {
  const san = new San("host-cli");
  const agents: IpsanChild[] = [];
  try {
    const station = await san.startStation();
    const common = ["--station", station.apiUrl, "--token-file", station.tokenFile];

    const cases: Array<[string[], number, RegExp]> = [
      [["request", ...common, "--host", "h1"], 2, /--size is required/],
      [["request", ...common, "--host", "h1", "--size", "eighty"], 2, /--size: invalid size "eighty"/],
      [["request", ...common, "--host", "h1", "--size", "1000"], 2, /--size: "1000" must be a positive multiple of 512/],
      [["request", ...common, "--host", "bad/name", "--size", "1M"], 2, /--host: invalid host name "bad\/name"/],
      [["request", "--station", "ftp://x", "--token-file", station.tokenFile, "--host", "h1", "--size", "1M"], 2, /--station: unsupported scheme/],
      [["request", "--station", station.apiUrl, "--token-file", san.tmp.file("missing"), "--host", "h1", "--size", "1M"], 2, /--token-file: cannot read/],
      [["request", ...common, "--host", "h1", "--size", "64M"], 1, /507 NO_SPACE/],
      [["attach", ...common, "--host", "h1"], 2, /exactly one of --assignment ID or --volume/],
      [["attach", ...common, "--host", "h1", "--volume", "nounit"], 2, /--volume: invalid "nounit"/],
      [["agent", ...common, "--host", "h1", "--heartbeat-ms", "5"], 2, /--heartbeat-ms: invalid "5"/],
      [["frobnicate"], 2, /unknown subcommand "frobnicate"/],
    ];
    for (const [args, code, pattern] of cases) {
      const result = await ipsan(["host", ...args]);
      assert.equal(result.code, code, describeResult(result));
      assert.match(result.stderr, pattern, describeResult(result));
    }
    writeFileSync(san.tmp.file("wrong.token"), "0".repeat(64));
    const wrong = await ipsan(["host", "request", "--station", station.apiUrl, "--token-file", san.tmp.file("wrong.token"), "--host", "h1", "--size", "1M"]);
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /401 UNAUTHENTICATED/);

    // An agent without --address registers the address it reaches the station from.
    const startAgent = (host: string, extra: string[] = []): IpsanChild => {
      const agent = new IpsanChild(
        ["host", "agent", ...common, "--host", host, "--heartbeat-ms", "200", "--state-dir", san.tmp.file(`state-${host}`), ...extra],
        { name: `agent-${host}`, logFile: san.log(`agent-${host}`), env: childEnv() },
      );
      agents.push(agent);
      return agent;
    };
    const a1 = startAgent("h1");
    await a1.waitForLine(/^ipsan host agent h1 running/, 10_000);
    const client = await san.client();
    const h1 = await waitFor("h1 online", async () => (await client.hosts()).find((h) => h.name === "h1" && h.state === "online"), {
      timeoutMs: 10_000,
    });
    assert.equal(h1.address, "127.0.0.1");
    const seen1 = h1.lastSeenAt;
    await waitFor("a later heartbeat", async () => (await client.hosts()).find((h) => h.name === "h1" && h.lastSeenAt !== seen1), {
      timeoutMs: 5_000,
    });

    // A host registered with a storage address keeps it when an agent without --address starts.
    await client.registerHost("h2", "127.0.0.9");
    const a2 = startAgent("h2");
    await a2.waitForLine(/^ipsan host agent h2 running/, 10_000);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await client.hosts()).find((h) => h.name === "h2")?.address, "127.0.0.9");

    for (const agent of agents) {
      const exit = await agent.stop("SIGTERM");
      assert.equal(exit.code, 0, `${agent.name} exits 0 on SIGTERM`);
    }
  } finally {
    for (const agent of agents) await agent.stop("SIGKILL");
    await san.close();
  }
});
