// The console at scale (issue 8): a real station with N simulated units of M
// volumes each (SimulatedUnits: the real discovery protocol over loopback
// UDP), and the console in real headless Chromium. Measures
// - first render of Units: from a page load of #/units (token already in the
//   tab's sessionStorage) until its table shows the first page of rows and
//   the pager counts every unit;
// - first render of Volumes: likewise, until the pager counts every volume;
// - live update: one unit says SHUTDOWN; the delay from the station's
//   event ("at" of the unit state event) to the row showing "down" in the
//   page (a MutationObserver stamps the moment), and from the SHUTDOWN sent.
// Prints the figures as JSON (docs/benchmarks.md "Web console at scale").
//
//   npm run bench:console -- [--units 1000] [--volumes 10] [--runs 3]
// (IPSAN_LOG=warn there: the simulated units in this process log every join)

import { pathToFileURL } from "node:url";
import { loadClusterKey } from "../discovery/keys.ts";
import { SimulatedUnits } from "../discovery/sim_units.ts";
import { startStation, type RunningStation } from "../station/harness.ts";
import { launchChromium, rowOf, signIn } from "../testing/browser.ts";
import { waitFor } from "../testing/process.ts";
import { UsageError } from "../util/errors.ts";
import { wantsHelp } from "../util/flags.ts";
import { parseBenchFlags } from "./report.ts";

export interface ConsoleScaleFigures {
  readonly units: number;
  readonly volumes: number;
  readonly joinMs: number;
  readonly unitsFirstRenderMs: number[];
  readonly volumesFirstRenderMs: number[];
  readonly liveUpdateFromEventMs: number;
  readonly liveUpdateFromShutdownMs: number;
}

interface StreamEvent {
  readonly seq: number;
  readonly at: string;
  readonly type: string;
  readonly subject: string;
  readonly data: Record<string, unknown>;
}

/** The first live event on the station's stream that `match`es. */
async function nextEvent(station: RunningStation, match: (event: StreamEvent) => boolean, timeoutMs: number): Promise<StreamEvent> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${station.token()}` }, signal: controller.signal });
    const reader = response.body?.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const chunk = await reader?.read();
      if (chunk === undefined || chunk.done) throw new Error("event stream ended");
      buffer += chunk.value;
      const frames = buffer.split("\n\n");
      buffer = frames.pop() ?? "";
      for (const frame of frames) {
        const data = /^data: (.*)$/m.exec(frame)?.[1];
        if (data === undefined) continue;
        const event = JSON.parse(data) as StreamEvent;
        if (match(event)) return event;
      }
    }
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

/** Runs the measurement; `log` gets progress lines. */
export async function measureConsoleAtScale(options: { units: number; volumesPerUnit: number; runs: number; log?: (line: string) => void }): Promise<ConsoleScaleFigures> {
  const log = options.log ?? (() => undefined);
  const total = options.units * options.volumesPerUnit;
  let station: RunningStation | undefined;
  let sim: SimulatedUnits | undefined;
  const browser = await launchChromium();
  try {
    station = await startStation({ env: { IPSAN_DISCOVERY_HEARTBEAT_MS: "2000", IPSAN_DISCOVERY_SUSPECT_MS: "10000", IPSAN_DISCOVERY_OFFLINE_MS: "30000" } });
    const s = station;
    const key = await loadClusterKey(s.clusterKeyFile());
    sim = new SimulatedUnits({ station: s.discovery, clusterKey: key, units: options.units, volumesPerUnit: options.volumesPerUnit, enrol: true });
    const t0 = Date.now();
    await sim.start();
    await waitFor(
      `${options.units} units with ${total} volumes in the station`,
      async () => {
        const health = (await s.api("GET", "/api/v1/health")).body as { units: number; volumes: number };
        return health.units === options.units && health.volumes === total ? true : undefined;
      },
      { timeoutMs: 120_000, intervalMs: 250 },
    );
    const joinMs = Date.now() - t0;
    log(`${options.units} units, ${total} volumes joined in ${joinMs} ms`);

    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    await signIn(page, s.url, s.token());
    const first = sim.names()[0] ?? "";
    const unitsFirstRenderMs: number[] = [];
    const volumesFirstRenderMs: number[] = [];
    for (let run = 0; run < options.runs; run++) {
      await page.goto(`${s.url}/#/units`);
      let started = Date.now();
      await page.reload();
      await rowOf(page, "Units", first).waitFor({ timeout: 30_000 });
      await page.getByText(`1–100 of ${options.units} units`).waitFor({ timeout: 30_000 });
      unitsFirstRenderMs.push(Date.now() - started);
      await page.goto(`${s.url}/#/volumes`);
      started = Date.now();
      await page.reload();
      await page.getByText(`1–100 of ${total} volumes`).waitFor({ timeout: 30_000 });
      volumesFirstRenderMs.push(Date.now() - started);
      log(`run ${run + 1}: Units ${unitsFirstRenderMs.at(-1)} ms, Volumes ${volumesFirstRenderMs.at(-1)} ms`);
    }

    // Live update: the first unit shuts down while its row is on screen.
    await page.goto(`${s.url}/#/units`);
    await page.reload();
    await rowOf(page, "Units", first).filter({ hasText: "online" }).waitFor({ timeout: 30_000 });
    await page.evaluate((name) => {
      const w = window as unknown as { downAt?: number };
      const observer = new MutationObserver(() => {
        const header = [...document.querySelectorAll("table[aria-label=Units] tbody th")].find((th) => th.textContent === name);
        if (header?.parentElement?.textContent?.includes("down") === true && w.downAt === undefined) w.downAt = performance.timeOrigin + performance.now();
      });
      observer.observe(document.body, { subtree: true, childList: true, characterData: true });
    }, first);
    const downEvent = nextEvent(s, (e) => e.type === "unit" && e.subject === first && e.data["state"] === "down", 15_000);
    await new Promise((resolve) => setTimeout(resolve, 200)); // the stream is open before the change
    const shutdownAt = Date.now();
    await sim.agents[0]?.stop(); // names() order: the first agent is `first`
    await rowOf(page, "Units", first).filter({ hasText: "down" }).waitFor({ timeout: 10_000 });
    const downAt = await page.evaluate(() => (window as unknown as { downAt?: number }).downAt ?? 0);
    const eventAt = Date.parse((await downEvent).at);
    await context.close();
    return {
      units: options.units,
      volumes: total,
      joinMs,
      unitsFirstRenderMs,
      volumesFirstRenderMs,
      liveUpdateFromEventMs: Math.round(downAt - eventAt),
      liveUpdateFromShutdownMs: Math.round(downAt - shutdownAt),
    };
  } finally {
    await browser.close();
    await sim?.stop("crash");
    await station?.close();
  }
}

export const CONSOLE_BENCH_USAGE = `usage: node dist/bench/console_bench.js [--units N] [--volumes N] [--runs N]
  simulated units (default 1000), volumes per unit (10), page loads measured (3); prints the figures as JSON`;

async function main(argv: readonly string[]): Promise<number> {
  let values: { units?: string; volumes?: string; runs?: string };
  try {
    ({ values } = parseBenchFlags(argv, CONSOLE_BENCH_USAGE, { units: { type: "string" }, volumes: { type: "string" }, runs: { type: "string" } }));
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`${error.message}\n`);
    return wantsHelp(argv) ? 0 : 2;
  }
  const figures = await measureConsoleAtScale({
    units: Number(values.units ?? "1000"),
    volumesPerUnit: Number(values.volumes ?? "10"),
    runs: Number(values.runs ?? "3"),
    log: (line) => process.stderr.write(`${line}\n`),
  });
  process.stdout.write(`${JSON.stringify(figures)}\n`);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`console bench: ${error instanceof Error ? error.stack : String(error)}\n`);
      process.exit(1);
    },
  );
}
