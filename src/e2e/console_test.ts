// Proves the web console (issue 8, docs/console.md) end to end in real
// headless Chromium (Debian's, driven by playwright-core) against a real
// `ipsan station` and real units on loopback, through the contract's
// accessible names only:
// - the station serves the console at / without a token (and nothing else
//   without one: POST / is 401, an asset path cannot climb out);
// - sign in with the admin token ("Token", "Sign in"); the token is kept in
//   sessionStorage, never in a URL or localStorage;
// - a unit started during the test appears on Units within 3 s, without a
//   reload (live from the event stream);
// - "Create volume" (fields "Unit", "Name", "Size", button "Create"), then
//   partition it, then assign partition 2 to host h1 through the forms, and
//   nbdinfo reaches that partition with h1's key over TLS (16 MiB), and
//   nbdcopy writes 16 MiB into it and reads the same back; the unit's page
//   shows its LBA map (volumes, partitions, free extents) and I/O charts when
//   the station keeps statistics (else "No statistics yet.");
// - kill -9 of a unit: its row turns suspect, then offline, without a reload
//   (short discovery timers from the environment);
// - a viewer's action buttons are disabled with a visible reason, and the
//   station refuses the viewer's request anyway; revoking its token ends its
//   event stream, and the console, trying again, shows "refused";
// - a screenshot of every page is saved in the artifacts dir
//   (test-artifacts/console/ or $IPSAN_ARTIFACTS/console), each checked to
//   show the data (the page's table has the rows).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { StationClient } from "../host/station_client.ts";
import { startStation, type RunningStation } from "../station/harness.ts";
import { joinArgs, liveAssignments, startJoinedUnit, type Assignment } from "../station/pool_harness.ts";
import { artifactsDir, launchChromium, rowOf, signIn } from "../testing/browser.ts";
import { run } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { adminLocalUri } from "../testing/tls_uri.ts";
import { REPO_ROOT, startUnit, type RunningUnit } from "../testing/unit.ts";

const TIMERS = { IPSAN_DISCOVERY_HEARTBEAT_MS: "100", IPSAN_DISCOVERY_SUSPECT_MS: "400", IPSAN_DISCOVERY_OFFLINE_MS: "1000" };
const MIB = 1024 * 1024;
const H1_IQN = "iqn.1994-05.com.redhat:h1";
let station: RunningStation;
let browser: Browser;
let tmp: TempDir;
const units: RunningUnit[] = [];
const shots = artifactsDir("console");

before(async () => {
  assert.ok(existsSync(join(REPO_ROOT, "dist", "console", "index.html")), "dist/console is built (npm run build:console; npm test builds it)");
  tmp = makeTempDir("console", memoryTmpBase());
  station = await startStation({ env: TIMERS });
  units.push(await startJoinedUnit(station, { name: "u1", capacity: "256M", volumes: [{ name: "base", size: "32M" }], tls: true, env: TIMERS }));
  const host = await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.1", iqn: H1_IQN });
  assert.equal(host.status, 201, host.text);
  browser = await launchChromium();
});
after(async () => {
  await browser?.close();
  for (const unit of units) await unit.close();
  await station?.close();
  tmp?.remove();
});

/** A full-page screenshot as tall as the content (a short viewport while it is taken). */
async function shot(page: Page, name: string): Promise<void> {
  const size = page.viewportSize() ?? { width: 1280, height: 860 };
  await page.setViewportSize({ width: size.width, height: 240 });
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  await page.setViewportSize(size);
}

async function gotoPage(page: Page, label: string): Promise<void> {
  await page.getByRole("navigation", { name: "Pages" }).getByRole("link", { name: label, exact: true }).click();
  await page.getByRole("heading", { level: 1, name: label, exact: true }).waitFor({ timeout: 5_000 });
}

test("the console's files are public, nothing else is", async () => {
  const index = await fetch(`${station.url}/`);
  assert.equal(index.status, 200);
  assert.match(index.headers.get("content-type") ?? "", /^text\/html/);
  assert.match(index.headers.get("content-security-policy") ?? "", /default-src 'self'/);
  assert.equal(index.headers.get("x-frame-options"), "DENY");
  const html = await index.text();
  const asset = /src="(\/assets\/[^"]+\.js)"/.exec(html)?.[1];
  assert.ok(asset !== undefined, html);
  const js = await fetch(`${station.url}${asset}`);
  assert.equal(js.status, 200);
  assert.match(js.headers.get("content-type") ?? "", /javascript/);
  assert.match(js.headers.get("cache-control") ?? "", /immutable/);
  for (const path of ["/assets/%2e%2e%2fadmin.token", "/assets/..%2f..%2fadmin.token", "/assets/.hidden", "/assets/"]) {
    assert.equal((await fetch(`${station.url}${path}`)).status, 404, path);
  }
  assert.equal((await fetch(`${station.url}/`, { method: "POST", body: "{}" })).status, 401);
  assert.equal((await fetch(`${station.url}/api/v1/units`)).status, 401);
});

test("sign in, live units, create + partition + assign through the forms, nbdinfo reaches it, kill -9 seen live, every page shot", { timeout: 120_000 }, async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  const errors: string[] = [];
  page.on("pageerror", (error) => errors.push(error.message));
  try {
    await signIn(page, station.url, station.token());
    assert.ok(!page.url().includes(station.token()), "the token is not in the URL");
    const stored = await page.evaluate(() => ({ session: sessionStorage.getItem("ipsan.token"), local: localStorage.length }));
    assert.equal(stored.session, station.token());
    assert.equal(stored.local, 0, "nothing in localStorage");

    // Units: u1 is there; u2, started now, appears within 3 s of its start, without a reload.
    await gotoPage(page, "Units");
    await rowOf(page, "Units", "u1").filter({ hasText: "online" }).waitFor({ timeout: 5_000 });
    const navigations: string[] = [];
    page.on("framenavigated", (frame) => navigations.push(frame.url()));
    const u2 = await startUnit({ name: "u2", capacity: "128M", control: true, volumes: [{ name: "w1", size: "8M" }], extraArgs: joinArgs(station), env: TIMERS });
    units.push(u2);
    const started = Date.now();
    await rowOf(page, "Units", "u2").filter({ hasText: "online" }).waitFor({ timeout: 3_000 });
    const appearedMs = Date.now() - started;
    process.stdout.write(`# u2 appeared on Units ${appearedMs} ms after its start\n`);
    assert.ok(appearedMs <= 3_000);
    await shot(page, "units");

    // Volumes: create through the form (Escape closes a form).
    await gotoPage(page, "Volumes");
    await page.getByRole("button", { name: "Create volume" }).click();
    await page.getByLabel("Name", { exact: true }).press("Escape");
    await page.getByRole("form", { name: "Create a volume" }).waitFor({ state: "detached", timeout: 2_000 }); // Escape closed it
    // From the keyboard: the form opens with its first field focused; Tab moves on, Enter submits.
    await page.getByRole("button", { name: "Create volume" }).click();
    // The form focuses its first field once it has rendered (a frame later on a loaded machine).
    await page.waitForFunction(() => document.activeElement?.id === "new-unit", null, { timeout: 2_000 }).catch(() => undefined);
    assert.equal(await page.evaluate(() => document.activeElement?.id), "new-unit", "the Unit field has the focus");
    await page.keyboard.type("u1");
    await page.keyboard.press("Tab");
    await page.keyboard.type("cv1");
    await page.keyboard.press("Tab");
    await page.keyboard.type("64M");
    assert.deepEqual(
      [await page.getByLabel("Unit", { exact: true }).inputValue(), await page.getByLabel("Name", { exact: true }).inputValue(), await page.getByLabel("Size", { exact: true }).inputValue()],
      ["u1", "cv1", "64M"],
    );
    await page.keyboard.press("Enter");
    await rowOf(page, "Volumes", "cv1").waitFor({ timeout: 10_000 });
    const created = await station.api("GET", "/api/v1/volumes/u1/cv1");
    assert.equal(created.status, 200, created.text);
    assert.equal((created.body as { sizeBytes: number }).sizeBytes, 64 * MIB);

    // Partition it: 16M + 16M.
    await page.getByRole("button", { name: "Partition u1/cv1" }).click();
    await page.getByLabel("Partition sizes").fill("16M, 16M");
    await page.getByRole("button", { name: "Partition", exact: true }).click();
    await rowOf(page, "Volumes", "cv1").filter({ hasText: "p2 16.0 MiB" }).waitFor({ timeout: 10_000 });

    // Assign partition 2 to h1.
    await page.getByRole("button", { name: "Assign u1/cv1" }).click();
    await page.getByLabel("Host", { exact: true }).fill("h1");
    await page.getByLabel("Partition", { exact: true }).fill("2");
    await page.getByRole("button", { name: "Assign", exact: true }).click();
    await rowOf(page, "Volumes", "cv1").filter({ hasText: "h1" }).waitFor({ timeout: 10_000 });
    await shot(page, "volumes");

    // nbdinfo reaches the partition with h1's key.
    const assignment = (await liveAssignments(station)).find((a: Assignment) => a.volume === "cv1");
    assert.ok(assignment !== undefined && assignment.state === "active", JSON.stringify(assignment));
    assert.equal(assignment.export, "cv1/p2");
    const client = new StationClient({ baseUrl: new URL(station.url), token: station.token() });
    const uri = await adminLocalUri(client, (assignment as { uri: string }).uri, "u1", tmp.file("keys"));
    const info = await run("nbdinfo", ["--size", uri], { timeoutMs: 15_000 });
    assert.equal(info.code, 0, info.stderr);
    assert.equal(info.stdout.trim(), String(16 * MIB));
    // Some I/O through it (data in, the same data back), for the unit's I/O charts.
    const data = randomBytes(16 * MIB);
    writeFileSync(tmp.file("in.img"), data);
    const copied = await run("nbdcopy", [tmp.file("in.img"), uri], { timeoutMs: 30_000 });
    assert.equal(copied.code, 0, copied.stderr);
    const back = await run("nbdcopy", [uri, tmp.file("out.img")], { timeoutMs: 30_000 });
    assert.equal(back.code, 0, back.stderr);
    assert.ok(readFileSync(tmp.file("out.img")).equals(data), "the partition holds what was written");

    // Every page, shot with its data.
    await gotoPage(page, "Pool");
    await page.getByRole("heading", { name: "Capacity", exact: true }).waitFor();
    await shot(page, "pool");
    await gotoPage(page, "Units");
    await page.getByRole("link", { name: "u1", exact: true }).click();
    await page.getByRole("img", { name: "LBA map of unit u1" }).waitFor({ timeout: 5_000 });
    await page.getByRole("table", { name: "Extents of unit u1" }).getByText("partition cv1/p2").waitFor();
    await page.getByRole("table", { name: "Extents of unit u1" }).getByText("free extent").first().waitFor();
    // I/O charts where the station keeps statistics (GET /api/v1/stats/units/NAME), else says there are none.
    const stats = await station.api("GET", "/api/v1/stats/units/u1?window=10m");
    if (stats.status === 200) await page.getByRole("img", { name: "IOPS chart" }).waitFor({ timeout: 20_000 });
    else {
      assert.equal(stats.status, 404, stats.text);
      await page.getByText("No statistics yet.").waitFor();
    }
    await shot(page, "unit");
    await gotoPage(page, "Hosts");
    await rowOf(page, "Hosts", "h1").getByRole("cell", { name: H1_IQN, exact: true }).waitFor();
    await shot(page, "hosts");
    await gotoPage(page, "Tasks");
    await shot(page, "tasks");
    await gotoPage(page, "Events");
    await page.getByRole("table", { name: "Events" }).getByRole("row").nth(3).waitFor({ timeout: 5_000 });
    await page.getByLabel("Type").selectOption("unit");
    await page.getByRole("table", { name: "Events" }).getByRole("cell", { name: "unit", exact: true }).first().waitFor();
    await shot(page, "events");
    await page.getByLabel("Type").selectOption("");

    // kill -9 u2: suspect, then offline, on the open Units page.
    await gotoPage(page, "Units");
    await rowOf(page, "Units", "u2").filter({ hasText: "online" }).waitFor({ timeout: 3_000 });
    await u2.kill9();
    const killed = Date.now();
    await rowOf(page, "Units", "u2").filter({ hasText: "suspect" }).waitFor({ timeout: 3_000 });
    const suspectMs = Date.now() - killed;
    await rowOf(page, "Units", "u2").filter({ hasText: "offline" }).waitFor({ timeout: 5_000 });
    process.stdout.write(`# after kill -9: suspect on the page in ${suspectMs} ms, offline in ${Date.now() - killed} ms\n`);
    await shot(page, "units-offline");
    assert.deepEqual(
      navigations.filter((u) => !u.includes("#")),
      [],
      "no reload: only hash navigations",
    );
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await context.close();
  }
});

test("a viewer sees everything and every action is disabled with a reason; the station refuses it anyway", { timeout: 60_000 }, async () => {
  const made = await station.api("POST", "/api/v1/tokens", { name: "look", role: "viewer" });
  assert.equal(made.status, 201, made.text);
  const secret = (made.body as { token: string }).token;
  const who = await station.api("GET", "/api/v1/whoami", undefined, { token: secret });
  assert.deepEqual(who.body, { name: "look", role: "viewer", host: null });
  const context = await browser.newContext({ viewport: { width: 420, height: 860 } }); // a narrow window too
  const page = await context.newPage();
  try {
    await signIn(page, station.url, secret);
    await gotoPage(page, "Volumes");
    await rowOf(page, "Volumes", "cv1").waitFor({ timeout: 5_000 });
    const create = page.getByRole("button", { name: "Create volume" });
    assert.equal(await create.isDisabled(), true);
    assert.match((await create.getAttribute("title")) ?? "", /viewer/);
    const describedBy = (await create.getAttribute("aria-describedby")) ?? "";
    assert.match(await page.locator(`#${describedBy}`).innerText(), /Read-only: .*viewer/);
    for (const name of ["Delete u1/cv1", "Grow u1/cv1", "Partition u1/cv1", "Assign u1/cv1", "Allocate for a host"]) {
      assert.equal(await page.getByRole("button", { name }).isDisabled(), true, name);
    }
    await page.screenshot({ path: join(shots, "viewer-narrow.png") });
    // The station is the authority: the same request from the viewer's page is refused.
    const status = await page.evaluate(async () => {
      const token = sessionStorage.getItem("ipsan.token") ?? "";
      const response = await fetch("/api/v1/volumes", { method: "POST", headers: { authorization: `Bearer ${token}` }, body: JSON.stringify({ unit: "u1", name: "nope", sizeBytes: "1M" }) });
      return response.status;
    });
    assert.equal(status, 403);
    // Revoking the token ends its event stream; the console tries again, is refused, and says so.
    await page.getByRole("status").filter({ hasText: /^live$/ }).waitFor({ timeout: 5_000 });
    assert.equal((await station.api("DELETE", "/api/v1/tokens/look")).status, 204);
    await page.getByRole("status").filter({ hasText: /^refused$/ }).waitFor({ timeout: 10_000 });
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("Token").waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem("ipsan.token")), null, "signing out forgets the token");
  } finally {
    await context.close();
  }
});
