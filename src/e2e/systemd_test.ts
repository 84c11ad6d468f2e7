// The systemd units shipped in deploy/systemd/ (issue 9, deployment): each file
// passes `systemd-analyze verify` without a warning, and the station and a unit
// work under the hardening their files ask for. No systemd runs here, so the
// test builds the same confinement by hand: a private mount namespace where
// the whole file system is read-only but the daemon's state directory, an
// unprivileged user (nobody, like DynamicUser=), no new
// privileges (setpriv), the cluster key handed over as a file of its own
// (LoadCredential=). The unit joins the station, the station creates a volume
// on it, and a write outside the state directory is refused in the same
// confinement (so the confinement is real).

import assert from "node:assert/strict";
import { chownSync, copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { test } from "node:test";
import { IpsanChild } from "../demo/child.ts";
import { StationClient } from "../host/station_client.ts";
import { run, waitFor } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";

const REPO = resolve(IPSAN_BIN, "..", "..");
const UNITS = join(REPO, "deploy", "systemd");
const NOBODY = 65534;

/** Runs `node bin/ipsan ARGS` as systemd would with the units' hardening, the state dir `data` the only writable place. */
function confined(data: readonly string[]): string[] {
  const binds = data.map((dir) => `mount --bind '${dir}' '${dir}'`).join(" && ");
  // PrivateTmp= is not rebuilt here: the checkout the test runs from may itself live under /tmp
  // (CI's fresh clone), and a tmpfs there would hide it. /tmp stays, read-only like the rest.
  const script = `${binds} && mount -o remount,bind,ro / && mount -o remount,bind,ro /dev/shm && exec setpriv --reuid ${NOBODY} --regid ${NOBODY} --clear-groups --no-new-privs "$0" "$@"`;
  return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script];
}

function stateDir(name: string): string {
  // On the root file system (which the confinement makes read-only, but for this directory).
  const dir = mkdtempSync(join("/var/tmp", `ipsan-systemd-${name}-`));
  chownSync(dir, NOBODY, NOBODY);
  return dir;
}

test("systemd-analyze verify: the shipped unit files have no unknown key or bad value", async () => {
  const files = readdirSync(UNITS).filter((f) => f.endsWith(".service"));
  assert.deepEqual(files.sort(), ["ipsan-host-agent.service", "ipsan-station.service", "ipsan-unit.service"]);
  const dir = mkdtempSync(join("/var/tmp", "ipsan-units-"));
  try {
    // The files name /usr/local/bin/ipsan (npm install -g); verify checks that ExecStart exists: point it at this checkout.
    for (const f of files) writeFileSync(join(dir, f), readFileSync(join(UNITS, f), "utf8").replaceAll("/usr/local/bin/ipsan", IPSAN_BIN));
    const verified = await run("systemd-analyze", ["verify", ...files.map((f) => join(dir, f))], { timeoutMs: 30_000 });
    assert.equal(verified.code, 0, verified.stderr);
    assert.equal(verified.stderr.trim(), "", "systemd-analyze verify warns");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the station and a unit run under the units' hardening: read-only file system but their state, user nobody, no new privileges", { timeout: 90_000 }, async () => {
  const stationData = stateDir("station");
  const unitData = stateDir("unit");
  const credentials = stateDir("credentials");
  let station: IpsanChild | undefined;
  let unit: IpsanChild | undefined;
  try {
    station = new IpsanChild(["station", "--data", stationData, "--http", "127.0.0.1:0", "--discovery", "127.0.0.1:0"], {
      name: "station",
      prefix: confined([stationData]),
      env: { ...process.env, IPSAN_DISCOVERY_HEARTBEAT_MS: "200" },
    });
    const api = (await station.waitForLine(/^ipsan station ready (\S+)$/, 30_000))[1] ?? "";
    const discovery = ((await station.waitForLine(/^ipsan station discovery udp:\/\/(\S+)$/, 5_000))[1] ?? "");
    // LoadCredential=: the key in a directory of its own, readable by the unit's user.
    copyFileSync(join(stationData, "cluster.key"), join(credentials, "cluster.key"));
    chownSync(join(credentials, "cluster.key"), NOBODY, NOBODY);
    unit = new IpsanChild(
      ["unit", "--name", "hardened", "--data", unitData, "--capacity", "256M", "--listen", "127.0.0.1:0", "--station", discovery, "--cluster-key-file", join(credentials, "cluster.key")],
      { name: "unit", prefix: confined([unitData]), env: { ...process.env, IPSAN_DISCOVERY_HEARTBEAT_MS: "200" } },
    );
    await unit.waitForLine(/^ipsan unit hardened ready /, 30_000);
    const client = new StationClient({ baseUrl: new URL(api), token: readFileSync(join(stationData, "admin.token"), "utf8").trim() });
    await waitFor("the hardened unit online in the station's pool", async () => ((await client.units()).find((u) => u.name === "hardened")?.state === "online" ? true : undefined), { timeoutMs: 30_000 });
    const created = await client.call("POST", "/api/v1/volumes", { unit: "hardened", name: "v1", sizeBytes: 16 * 1024 * 1024 });
    assert.equal((created as { name?: string }).name, "v1");
    assert.ok(readdirSync(stationData).includes("station.db"), "the station's database is in its state directory");
    assert.ok(readdirSync(unitData).includes("storage.img"), "the unit's storage is in its state directory");

    // The confinement is real: the same setup refuses a write anywhere else.
    const outside = join(REPO, `ipsan-systemd-test-${process.pid}`);
    const refused = await run(confined([unitData])[0] as string, [...confined([unitData]).slice(1), "touch", outside], { timeoutMs: 10_000 });
    assert.notEqual(refused.code, 0, "a write outside the state directory succeeded");
    assert.match(refused.stderr, /Read-only file system|Permission denied/);
  } finally {
    await unit?.stop("SIGTERM");
    await station?.stop("SIGTERM");
    for (const dir of [stationData, unitData, credentials]) rmSync(dir, { recursive: true, force: true });
  }
});
