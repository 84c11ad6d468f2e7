// `ipsan demo`, the README's main job: `ipsan demo --units 3` prints its ready
// lines; the station it started lists all three units online; the printed
// one-line example (host request | uri, then nbdinfo and nbdcopy on it, over TLS), run
// as printed by bash, works; SIGINT makes the demo exit 0 after the units went
// down, which we see in the station's own event stream (three unit "down"
// events arrive before the stream ends, i.e. while the station still ran).
// A second start on the same data dir reuses it (same admin token, the volume
// made by the example is still in the pool). And a unit that dies on its own
// makes the demo report it and exit non-zero.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { IPSAN_BIN } from "../testing/unit.ts";
import { IpsanChild } from "../demo/child.ts";
import { StationClient, readTokenFile } from "../host/station_client.ts";
import { childEnv, describeResult, run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";

interface StationEvent {
  type?: string;
  action?: string;
  subject?: string;
  data?: { name?: string; state?: string } | null;
}

/** Collects the station's SSE events until the stream ends (the station stopped). */
function collectEvents(apiUrl: string, token: string): { events: StationEvent[]; ended: Promise<void> } {
  const events: StationEvent[] = [];
  const ended = (async () => {
    try {
      const response = await fetch(new URL("/api/v1/events", apiUrl), { headers: { authorization: `Bearer ${token}` } });
      const reader = response.body?.getReader();
      if (reader === undefined) return;
      const decoder = new TextDecoder();
      let text = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        text += decoder.decode(value, { stream: true });
        let cut: number;
        while ((cut = text.indexOf("\n\n")) >= 0) {
          const block = text.slice(0, cut);
          text = text.slice(cut + 2);
          const data = block
            .split("\n")
            .filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trim())
            .join("\n");
          if (data !== "") {
            try {
              events.push(JSON.parse(data) as StationEvent);
            } catch {
              // not JSON: not an event we look at
            }
          }
        }
      }
    } catch {
      // connection reset when the station exits: the stream ended
    }
  })();
  return { events, ended };
}

function unitDown(event: StationEvent): string | undefined {
  if (event.type !== "unit" || event.data?.state !== "down") return undefined;
  return event.data?.name ?? event.subject;
}

test("ipsan demo --units 3: ready, example works, Ctrl-C stops units then station, restart reuses data", { timeout: 120_000 }, async () => {
  const tmp = makeTempDir("demo");
  let demo: IpsanChild | undefined;
  try {
    const dataDir = tmp.file("data");
    // The user's config dir of this test (the demo writes ~/.config/ipsan/config there).
    const env = childEnv({ XDG_CONFIG_HOME: tmp.file("config") });
    demo = new IpsanChild(["demo", "--units", "3", "--data", dataDir, "--capacity", "256M", "--http", "127.0.0.1:0"], {
      name: "demo",
      logFile: tmp.file("demo.log"),
      env,
    });
    const apiUrl = (await demo.waitForLine(/^ipsan demo ready (http:\/\/\S+)$/, 60_000))[1] ?? "";
    const tokenFile = (await demo.waitForLine(/^ipsan demo token (\S+)$/, 1_000))[1] ?? "";
    const example = (await demo.waitForLine(/^ipsan demo example (.+)$/, 1_000))[1] ?? "";
    await demo.waitForLine(/^ipsan demo units u1 u2 u3 online/, 1_000);
    const token = await readTokenFile(tokenFile);
    const client = new StationClient({ baseUrl: new URL(apiUrl), token });
    const units = await client.units();
    assert.deepEqual(units.filter((u) => u.state === "online").map((u) => u.name).sort(), ["u1", "u2", "u3"]);

    // Issue 9 item 5: the demo wrote a config file pointing at itself: `ipsan units` works with no flag.
    const configLine = demo.lines.find((line) => line.startsWith("ipsan demo config "));
    assert.equal(configLine?.split(" ")[3], tmp.file("config/ipsan/config"));
    const listed = await run(process.execPath, [IPSAN_BIN, "units", "--json"], { env: { XDG_CONFIG_HOME: tmp.file("config") }, timeoutMs: 20_000 });
    assert.equal(listed.code, 0, describeResult(listed));
    assert.deepEqual((JSON.parse(listed.stdout) as { items: { name: string }[] }).items.map((u) => u.name).sort(), ["u1", "u2", "u3"]);

    const ran = await run("bash", ["-c", example], { timeoutMs: 60_000 });
    assert.equal(ran.code, 0, describeResult(ran));
    assert.match(ran.stdout, /protocol: newstyle-fixed with TLS/, "nbdinfo speaks TLS to the unit with the printed URI");
    assert.match(ran.stdout, /export-size: 67108864/, "nbdinfo on the printed URI");
    assert.match(ran.stdout, / 67108864 .*demo-copy\.img/, "nbdcopy read the whole volume through the printed URI");
    assert.equal((await client.assignments()).length, 1);

    const stream = collectEvents(apiUrl, token);
    await new Promise((r) => setTimeout(r, 300)); // subscribed before the stop
    demo.signal("SIGINT");
    const exit = await demo.exited;
    assert.equal(exit.code, 0, `demo exit: ${JSON.stringify(exit)}\n${readFileSync(tmp.file("demo.log"), "utf8").slice(-3000)}`);
    assert.ok(demo.lines.includes("ipsan demo stopped"));
    assert.equal(existsSync(tmp.file("config/ipsan/config")), false, "the demo's config file goes with it");
    await stream.ended;
    const down = stream.events.map(unitDown).filter((n) => n !== undefined).sort();
    assert.deepEqual(down, ["u1", "u2", "u3"], `unit down events seen by the station before it stopped: ${JSON.stringify(stream.events)}`);

    // Restart on the same data dir: same token, same volume.
    demo = new IpsanChild(["demo", "--units", "3", "--data", dataDir, "--capacity", "256M", "--http", "127.0.0.1:0"], {
      name: "demo-again",
      logFile: tmp.file("demo2.log"),
      env,
    });
    const apiUrl2 = (await demo.waitForLine(/^ipsan demo ready (http:\/\/\S+)$/, 60_000))[1] ?? "";
    assert.equal(await readTokenFile(tokenFile), token, "the admin token is reused");
    const client2 = new StationClient({ baseUrl: new URL(apiUrl2), token });
    assert.equal((await client2.assignments()).length, 1, "the example's assignment is still there");

    // A unit dying on its own: reported, demo exits non-zero.
    const unitPid = Number(
      (await run("pgrep", ["-f", `unit --name u2 --data ${dataDir}/u2`], { timeoutMs: 5_000 })).stdout.trim().split("\n")[0],
    );
    assert.ok(unitPid > 0, "found unit u2's pid");
    process.kill(unitPid, "SIGKILL");
    const crashed = await demo.exited;
    assert.equal(crashed.code, 1);
    assert.match(readFileSync(tmp.file("demo2.log"), "utf8"), /u2 exited unexpectedly/);
  } finally {
    await demo?.stop("SIGTERM");
    tmp.remove();
  }
});
