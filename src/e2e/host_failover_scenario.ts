// The spare-host proof of issue 6 (section 4, docs/adr/0010), shared by the
// test and its canary: a station, two units and two hosts, each in its own
// network namespace (so the units tell the hosts apart by real source
// addresses). h1 runs `ipsan host agent`, h2 `ipsan host agent --spare`. h1
// requests a mirrored volume (copies 2), attaches it (--mode nbd: its mirror
// engine) and writes pattern A. Then h1's agent and engine are SIGSTOPped:
// - the station moves the volume to h2 within --host-failover-after + 10 s;
// - h2's agent attaches it (its own engine, from the legs); h2 reads A and
//   writes pattern B;
// - SIGCONT of h1's engine only (its agent stays stopped, so it cannot detach
//   and hide the outcome): h1's next write through its engine fails, and the
//   units count refused attempts of h1 (GET /v1/info refused);
// - the volume holds h2's data (B, not h1's C), read through h2's engine.
// Both hosts run with their own host credentials (issue 7): each registers
// with a one-time join token (`ipsan host register`, from its namespace), and
// its agent, request and attach then run with --state-dir alone: the whole
// agent loop (register, heartbeat, re-attach, leg reports, the spare's
// takeover of the moved assignment, which is then its own) works with a
// credential that reaches that host's records only.
// `unitBin` runs the units from another build (the canary's, whose units keep
// a revoked host's open connections working): the scenario must then fail.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { IpsanChild } from "../demo/child.ts";
import { childEnv, describeResult, run, waitFor, type CommandResult } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { San, type UnitProcess } from "./harness.ts";
import { PrivateNetwork, type NetNode } from "./netns.ts";

export const FAILOVER_AFTER_S = 3;
const MIB = 1024 * 1024;

interface Moved {
  id: string;
  host: string;
  hostAddress: string;
  movedFrom: string | null;
  movedAt: string | null;
  state: string;
  legs: { unit: string; volume: string }[];
}

function inNs(node: NetNode, command: string, args: readonly string[], timeoutMs = 30_000): Promise<CommandResult> {
  return run("ip", [...node.exec.slice(1), command, ...args], { timeoutMs });
}

/** GET a URL from inside a namespace with a bearer token (the root namespace cannot reach these addresses). */
async function getJson(node: NetNode, url: string, token: string): Promise<unknown> {
  const script = `
    fetch(process.argv[1], { headers: { authorization: "Bearer " + process.argv[2] }, signal: AbortSignal.timeout(5000) })
      .then(async (r) => { process.stdout.write(await r.text()); process.exit(r.ok ? 0 : 1); })
      .catch((e) => { process.stderr.write(String(e)); process.exit(2); });`;
  const result = await inNs(node, process.execPath, ["-e", script, url, token], 15_000);
  if (result.code !== 0) throw new Error(`GET ${url}: ${describeResult(result)}`);
  return JSON.parse(result.stdout);
}

async function nbdWrite(node: NetNode, uri: string, file: string, timeoutMs = 30_000): Promise<CommandResult> {
  return inNs(node, "nbdsh", ["-u", uri, "-c", `h.pwrite(open(${JSON.stringify(file)}, "rb").read(), 0); h.flush()`], timeoutMs);
}

async function nbdRead(node: NetNode, uri: string, length: number): Promise<Buffer> {
  const result = await inNs(node, "nbdsh", ["-u", uri, "-c", `import sys; sys.stdout.buffer.write(h.pread(${length}, 0).hex().encode())`]);
  if (result.code !== 0) throw new Error(`read ${uri}: ${describeResult(result)}`);
  return Buffer.from(result.stdout.trim(), "hex");
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

/** The last lines of every log of the scenario (station, units, agents, engines). */
function logTails(san: San): string {
  const out: string[] = [];
  const files = [...["station", "u1", "u2", "agent-h1", "agent-h2"].map((n) => san.log(n))];
  for (const host of ["h1", "h2"]) {
    try {
      for (const f of readdirSync(join(san.tmp.path, `state-${host}`, "log"))) files.push(join(san.tmp.path, `state-${host}`, "log", f));
    } catch {
      // no engine log
    }
  }
  for (const file of files) {
    try {
      out.push(`--- ${file}\n${readFileSync(file, "utf8").split("\n").slice(-15).join("\n")}`);
    } catch {
      // not written
    }
  }
  return out.join("\n");
}

export interface ScenarioResult {
  readonly movedWithinMs: number;
  readonly refusedBefore: number;
  readonly refusedAfter: number;
  readonly h1WriteResult: string;
}

export async function spareHostScenario(name: string, options: { unitBin?: string } = {}): Promise<ScenarioResult> {
  const net = await PrivateNetwork.create(["st", "u1", "u2", "h1", "h2"]);
  const san = new San(name);
  const stopped: number[] = [];
  const engines: number[] = [];
  const agents: IpsanChild[] = [];
  try {
    const st = net.node("st");
    const h1 = net.node("h1");
    const h2 = net.node("h2");
    const station = await san.startStation({
      http: `${st.address}:0`,
      discovery: `${st.address}:0`,
      prefix: st.exec,
      extraArgs: ["--host-failover-after", `${FAILOVER_AFTER_S}s`, "--host-offline-after-ms", "1500", "--reconcile-interval-ms", "1000"],
    });
    const apiUrl = station.apiUrl;
    const token = readFileSync(station.tokenFile, "utf8").trim();
    const units: UnitProcess[] = [];
    for (const unitName of ["u1", "u2"]) {
      const node = net.node(unitName);
      units.push(await san.startUnit(unitName, { address: node.address, prefix: node.exec, ...(options.unitBin === undefined ? {} : { bin: options.unitBin }) }));
    }
    await waitFor(
      "both units online",
      async () => {
        const body = (await getJson(h1, `${apiUrl}/api/v1/units`, token).catch(() => undefined)) as { items?: { name: string; state: string }[] } | undefined;
        return ["u1", "u2"].every((u) => body?.items?.some((x) => x.name === u && x.state === "online")) ? true : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 200 },
    );
    const refusedTotal = async (): Promise<number> => {
      let total = 0;
      for (const unit of units) {
        const unitToken = readFileSync(join(unit.dataDir, "control.token"), "utf8").trim();
        const info = (await getJson(st, `${unit.control}/v1/info`, unitToken)) as { refused: { connections: number; opens: number } };
        total += info.refused.connections + info.refused.opens;
      }
      return total;
    };

    const stateDir = (node: NetNode) => san.tmp.file(`state-${node.name}`);
    // Enrolment: the admin makes a join token per host; the host registers with it from its own address.
    for (const node of [h1, h2]) {
      const made = await inNs(st, process.execPath, [IPSAN_BIN, "hosts", "token", "create", "--host", node.name, "--expires", "10m", "--json", "--station", apiUrl, "--token-file", station.tokenFile]);
      assert.equal(made.code, 0, describeResult(made));
      const joinFile = san.tmp.file(`join-${node.name}.token`);
      writeFileSync(joinFile, `${(JSON.parse(made.stdout) as { token: string }).token}\n`, { mode: 0o600 });
      const registered = await inNs(node, process.execPath, [IPSAN_BIN, "host", "register", "--station", apiUrl, "--token-file", joinFile, "--host", node.name, "--state-dir", stateDir(node)]);
      assert.equal(registered.code, 0, describeResult(registered));
    }
    // From here on each host speaks with its own credential, from its state dir.
    const common = (node: NetNode) => ["--state-dir", stateDir(node)];
    const agent = (node: NetNode, extra: readonly string[]): IpsanChild => {
      const child = new IpsanChild(["host", "agent", ...common(node), "--heartbeat-ms", "300", ...extra], {
        name: `agent-${node.name}`,
        logFile: san.log(`agent-${node.name}`),
        env: childEnv(),
        prefix: node.exec,
      });
      agents.push(child);
      return child;
    };
    const spareAgent = agent(h2, ["--spare"]);
    await spareAgent.waitForLine(/^ipsan host agent h2 running .*\(spare\)/, 20_000);
    // h1's agent runs from the start, as on a real host: h1 heartbeats while it requests and attaches
    // (a loaded machine can take longer than --host-failover-after for that).
    const h1Agent = agent(h1, []);
    await h1Agent.waitForLine(/^ipsan host agent h1 running/, 20_000);
    await waitFor(
      "h1 registered by its agent",
      async () => {
        const host = (await getJson(h1, `${apiUrl}/api/v1/hosts/h1`, token).catch(() => undefined)) as { address?: string } | undefined;
        return host?.address === h1.address ? true : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 200 },
    );

    const mirror = (await san.host(["request", ...common(h1), "--size", "32M", "--copies", "2", "--json"], h1.exec)).json as Moved;
    const attached = (await san.host(["attach", ...common(h1), "--assignment", mirror.id, "--mode", "nbd", "--json"], h1.exec))
      .json as { uri: string; pid: number };
    engines.push(attached.pid);
    const patternA = randomBytes(MIB);
    const patternB = randomBytes(MIB);
    const patternC = randomBytes(MIB);
    for (const [file, data] of [["a", patternA], ["b", patternB], ["c", patternC]] as const) writeFileSync(san.tmp.file(file), data);
    const wroteA = await nbdWrite(h1, attached.uri, san.tmp.file("a"));
    assert.equal(wroteA.code, 0, describeResult(wroteA));

    // h1 freezes: its agent (no heartbeats) and its engine (holding its connections to both units).
    const h1AgentPid = h1Agent.process.pid ?? -1;
    for (const pid of [h1AgentPid, attached.pid]) {
      signal(pid, "SIGSTOP");
      stopped.push(pid);
    }
    const frozenAtMs = Date.now();
    const moved = await waitFor(
      "the station moves the volume to the spare h2",
      async () => {
        const a = (await getJson(h2, `${apiUrl}/api/v1/assignments/${mirror.id}`, token).catch(() => undefined)) as Moved | undefined;
        return a?.host === "h2" && a.movedAt !== null ? a : undefined;
      },
      { timeoutMs: (FAILOVER_AFTER_S + 10) * 1000, intervalMs: 200 },
    );
    const movedWithinMs = Date.now() - frozenAtMs;
    assert.equal(moved.movedFrom, "h1");
    assert.equal(moved.hostAddress, h2.address);

    // h2's agent takes it over: its own engine on the same legs.
    const taken = await waitFor(
      "h2's agent attaches the moved volume",
      async () => {
        const result = await san.host(["list", "--state-dir", stateDir(h2), "--json"], h2.exec).catch(() => undefined);
        const items = (result?.json as { items?: { assignment: string; alive: boolean; path: string; pid: number | null }[] } | undefined)?.items ?? [];
        return items.find((i) => i.assignment === mirror.id && i.alive);
      },
      { timeoutMs: 30_000, intervalMs: 300 },
    );
    if (taken.pid !== null) engines.push(taken.pid);
    assert.ok(
      (await nbdRead(h2, taken.path, MIB)).equals(patternA),
      "h2 reads what h1 wrote before it froze",
    );
    const wroteB = await nbdWrite(h2, taken.path, san.tmp.file("b"));
    assert.equal(wroteB.code, 0, describeResult(wroteB));

    // h1's engine wakes up (its agent stays frozen so that nothing detaches it): its next write fails.
    const refusedBefore = await refusedTotal();
    signal(attached.pid, "SIGCONT");
    const wroteC = await nbdWrite(h1, attached.uri, san.tmp.file("c"), 60_000);
    const h1WriteResult = describeResult(wroteC);
    assert.notEqual(wroteC.code, 0, `h1's write after waking up must fail: ${h1WriteResult}`);
    const refusedAfter = await waitFor(
      "the units count h1's refused attempts",
      async () => {
        const now = await refusedTotal();
        return now > refusedBefore ? now : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 300 },
    );
    signal(h1AgentPid, "SIGCONT");
    stopped.splice(0);

    // The volume holds h2's data.
    assert.ok((await nbdRead(h2, taken.path, MIB)).equals(patternB), "the volume holds h2's data, not h1's");
    // The hosts' credentials were enough for the whole loop: the audit log holds no refusal of either, and their own changes.
    // One exception is the fence working: h1, woken after its mirror moved to h2, may report that mirror's legs once
    // more before its agent sees the move; the station refuses it (403: the assignment is h2's now).
    const audit = readFileSync(join(dirname(station.tokenFile), "audit.log"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { actor: string; action: string; status: number; ids?: { id?: string } });
    const fenced = (e: (typeof audit)[number]): boolean => e.actor === "host:h1" && e.status === 403 && e.ids?.id === mirror.id;
    const refused = audit.filter((e) => e.actor.startsWith("host:") && e.status >= 400 && !fenced(e));
    assert.deepEqual(refused, [], "no request of a host credential was refused (but the fenced h1's, on the mirror moved away)");
    for (const [actor, action] of [["host:h1", "POST /api/v1/allocations"], ["host:h2", "PUT /api/v1/hosts/:name"], ["host:h2", "PUT /api/v1/assignments/:id/legs"]]) {
      assert.ok(audit.some((e) => e.actor === actor && e.action === action && e.status < 300), `${actor} ${action} in the audit log`);
    }
    return { movedWithinMs, refusedBefore, refusedAfter, h1WriteResult };
  } catch (error) {
    // The logs' tails go with the failure (the temp dir is removed below unless IPSAN_KEEP_TMP=1).
    throw new Error(`${error instanceof Error ? error.message : String(error)}\n${logTails(san)}`, { cause: error });
  } finally {
    for (const pid of stopped) signal(pid, "SIGCONT");
    await Promise.all(agents.map((a) => a.stop("SIGTERM")));
    for (const pid of engines) signal(pid, "SIGKILL");
    await san.close();
    await net.destroy();
  }
}
