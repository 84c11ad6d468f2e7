// The newcomer test (issue 9 "Proof"): follows docs/OPERATIONS.md literally.
// The walkthrough between `<!-- newcomer: begin -->` and `<!-- newcomer: end -->`
// is read from the document at run time; every ```sh block in it carries a
// directive in the HTML comment just above it:
//
//   <!-- newcomer: MACHINE [expect="REGEX"] [retry=SECONDS] -->
//       run the block on MACHINE (bash -e -o pipefail); it must exit 0 and, with
//       expect, its output must match (retry: again until it does, bounded)
//   <!-- newcomer: MACHINE fails="REGEX" -->
//       a troubleshooting example: it must exit non-zero and print a match
//   <!-- newcomer: MACHINE service=NAME ready="TEXT" -->
//       the command line systemd's NAME.service runs on MACHINE: not run here,
//       but where a later block says `systemctl enable --now|start|restart|stop NAME`
//       (directive `systemd`), the test starts or stops this command line
//       instead, and "started" means TEXT appeared on its stdout
//   <!-- newcomer: skip (WHY) -->
//       not run (installing the package: src/e2e/package_test.ts; systemd's own
//       units are checked by src/e2e/systemd_test.ts)
//
// Each machine is a network namespace with its own address (src/e2e/netns.ts);
// its files are under a temporary directory. The only substitutions: the
// document's example addresses 192.0.2.{10,11,12,21} become the namespaces'
// addresses, and /etc/ipsan, /var/lib/ipsan-* and /var/backups become
// MACHINE_ROOT/etc/ipsan, ... (the `ipsan` on PATH sets IPSAN_CONFIG to MACHINE_ROOT/etc/ipsan/ipsan.conf
// when it exists: the file the CLI would find at /etc/ipsan/ipsan.conf). `ipsan` on PATH is
// this checkout's bin/ipsan; `scp root@ADDRESS:PATH LOCAL` copies from that
// machine's root (the namespaces share one file system; the copy stands in for
// the transport only). Ports are the documented fixed ones: each namespace has
// its own port space, so nothing else on the machine can collide with them.
// A wrong command, flag, path, port or expected output in the document fails
// the test at that block, naming it.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { IPSAN_BIN } from "../demo/child.ts";
import { describeResult, run, systemFirstPath, type CommandResult } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { PrivateNetwork } from "./netns.ts";

const DOC = join(dirname(dirname(dirname(fileURLToPath(import.meta.url)))), "docs", "OPERATIONS.md");
const BLOCK_TIMEOUT_MS = 30_000;
const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 15_000;
const RETRY_INTERVAL_MS = 500;
const RETRY_SECONDS_MAX = 60;
/** The document's example machines and addresses (its "machine" table). */
const MACHINES: Readonly<Record<string, string>> = { station: "192.0.2.10", unit1: "192.0.2.11", unit2: "192.0.2.12", host1: "192.0.2.21" };
/** The document's example paths; each becomes MACHINE_ROOT + path. */
const PATH_PLACEHOLDER = /(?<![:\w])(\/etc\/ipsan|\/var\/lib\/ipsan-[a-z]+|\/var\/backups)/g;

interface Block {
  readonly line: number;
  readonly directive: Directive;
  readonly text: string;
}

interface Directive {
  readonly machine: string;
  readonly skip: boolean;
  readonly systemd: boolean;
  readonly attrs: Readonly<Record<string, string>>;
}

export function parseDirective(comment: string, line: number): Directive {
  const body = /^<!--\s*newcomer:\s*(.*?)\s*-->$/.exec(comment.trim())?.[1];
  if (body === undefined) throw new Error(`docs/OPERATIONS.md:${line}: a sh block in the walkthrough needs a <!-- newcomer: ... --> line above it`);
  const machine = body.split(/\s+/)[0] ?? "";
  if (machine === "skip") return { machine, skip: true, systemd: false, attrs: {} };
  if (MACHINES[machine] === undefined) throw new Error(`docs/OPERATIONS.md:${line}: unknown machine "${machine}"`);
  const attrs: Record<string, string> = {};
  let systemd = false;
  const tail = body.slice(machine.length);
  for (const match of tail.matchAll(/(\w+)(?:=(?:"((?:[^"\\]|\\.)*)"|(\S+)))?/g)) {
    const [, key = "", quoted, bare] = match;
    if (quoted === undefined && bare === undefined) {
      if (key !== "systemd") throw new Error(`docs/OPERATIONS.md:${line}: unknown directive word "${key}"`);
      systemd = true;
      continue;
    }
    attrs[key] = quoted === undefined ? (bare ?? "") : quoted.replace(/\\"/g, '"');
  }
  return { machine, skip: false, systemd, attrs };
}

/** The walkthrough's sh blocks, each with its directive. */
export function walkthroughBlocks(markdown: string): Block[] {
  const lines = markdown.split("\n");
  const begin = lines.findIndex((l) => l.trim() === "<!-- newcomer: begin -->");
  const end = lines.findIndex((l) => l.trim() === "<!-- newcomer: end -->");
  if (begin < 0 || end < begin) throw new Error("docs/OPERATIONS.md: no <!-- newcomer: begin --> ... <!-- newcomer: end --> walkthrough");
  const blocks: Block[] = [];
  let comment: { text: string; line: number } | undefined;
  for (let i = begin + 1; i < end; i++) {
    const line = lines[i] ?? "";
    if (line.startsWith("<!-- newcomer:")) {
      comment = { text: line, line: i + 1 };
      continue;
    }
    if (line.startsWith("```sh")) {
      const body: string[] = [];
      let j = i + 1;
      for (; j < end && lines[j] !== "```"; j++) body.push(lines[j] ?? "");
      if (comment === undefined || comment.line !== i) throw new Error(`docs/OPERATIONS.md:${i + 1}: a sh block in the walkthrough needs a <!-- newcomer: ... --> line right above it`);
      blocks.push({ line: i + 1, directive: parseDirective(comment.text, comment.line), text: body.join("\n") });
      comment = undefined;
      i = j;
      continue;
    }
    if (line.startsWith("```")) {
      // Fenced blocks that are not sh (config excerpts) are not commands.
      let j = i + 1;
      while (j < end && lines[j] !== "```") j++;
      i = j;
    }
  }
  return blocks;
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

interface Machine {
  readonly name: string;
  readonly ns: string;
  readonly address: string;
  readonly root: string;
}

class Walkthrough {
  readonly machines = new Map<string, Machine>();
  readonly services = new Map<string, { block: Block; child?: ChildProcess; exited?: Promise<void> }>();
  readonly bin: string;
  readonly #addressOf = new Map<string, string>();

  constructor(tmpPath: string, net: PrivateNetwork) {
    this.bin = join(tmpPath, "bin");
    mkdirSync(this.bin, { recursive: true });
    for (const [name, example] of Object.entries(MACHINES)) {
      const node = net.node(name);
      const root = join(tmpPath, name);
      mkdirSync(join(root, "root"), { recursive: true });
      this.machines.set(name, { name, ns: node.ns, address: node.address, root });
      this.#addressOf.set(example, node.address);
    }
    // The CLI's /etc/ipsan/ipsan.conf is MACHINE_ROOT/etc/ipsan/ipsan.conf here: named when it exists, as the CLI finds it.
    writeFileSync(
      join(this.bin, "ipsan"),
      `#!/bin/sh\nif [ -e "$NEWCOMER_ROOT/etc/ipsan/ipsan.conf" ]; then export IPSAN_CONFIG="$NEWCOMER_ROOT/etc/ipsan/ipsan.conf"; fi\nexec ${process.execPath} ${IPSAN_BIN} "$@"\n`,
      { mode: 0o755 },
    );
    // scp [-OPTIONS] SOURCE... TARGET, where a remote operand is [USER@]ADDRESS:PATH on a machine here.
    const roots = Object.fromEntries([...this.machines.values()].map((m) => [m.address, m.root]));
    writeFileSync(
      join(this.bin, "scp"),
      `#!${process.execPath}
const fs = require("node:fs");
const roots = ${JSON.stringify(roots)};
const local = (operand) => {
  const m = /^(?:[^@]+@)?([0-9.]+):(\\/.*)$/.exec(operand);
  if (m === null) return operand;
  if (roots[m[1]] === undefined) { process.stderr.write("ssh: connect to host " + m[1] + " port 22: No route to host\\n"); process.exit(1); }
  return roots[m[1]] + m[2];
};
const operands = process.argv.slice(2).filter((a) => !a.startsWith("-")).map(local);
const target = operands.pop();
for (const source of operands) fs.copyFileSync(source, fs.existsSync(target) && fs.statSync(target).isDirectory() ? target + "/" + require("node:path").basename(source) : target);
`,
      { mode: 0o755 },
    );
  }

  machine(name: string): Machine {
    const machine = this.machines.get(name);
    if (machine === undefined) throw new Error(`no machine ${name}`);
    return machine;
  }

  /** The document's placeholders in `text` for `machine` (regex-escaped when `regex`). */
  substitute(text: string, machine: Machine, regex = false): string {
    const put = (value: string): string => (regex ? escapeRegExp(value) : value);
    let out = text.replace(regex ? /192\\\.0\\\.2\\\.(\d+)/g : /192\.0\.2\.(\d+)/g, (_found, last: string) => {
      const address = this.#addressOf.get(`192.0.2.${last}`);
      if (address === undefined) throw new Error(`the document uses 192.0.2.${last}, which is no machine of its table`);
      return put(address);
    });
    out = out.replace(regex ? /(?<![:\w])(\/etc\/ipsan|\/var\/lib\/ipsan-[a-z]+|\/var\/backups)/g : PATH_PLACEHOLDER, (path: string) => put(machine.root + path));
    return out;
  }

  env(machine: Machine): Record<string, string> {
    return { PATH: `${this.bin}:${systemFirstPath()}`, NEWCOMER_ROOT: machine.root };
  }

  async runBlock(block: Block): Promise<CommandResult> {
    const machine = this.machine(block.directive.machine);
    const script = this.substitute(block.text, machine);
    return run("ip", ["netns", "exec", machine.ns, "bash", "-e", "-o", "pipefail", "-c", script], {
      timeoutMs: BLOCK_TIMEOUT_MS,
      env: this.env(machine),
      cwd: join(machine.root, "root"),
    });
  }

  async check(block: Block): Promise<void> {
    const machine = this.machine(block.directive.machine);
    const expect = block.directive.attrs["expect"];
    const fails = block.directive.attrs["fails"];
    assert.ok(expect === undefined || fails === undefined, `docs/OPERATIONS.md:${block.line}: expect= or fails=, not both`);
    const wanted = expect ?? fails;
    const pattern = wanted === undefined ? undefined : new RegExp(this.substitute(wanted, machine, true));
    const retrySeconds = Number(block.directive.attrs["retry"] ?? "0");
    assert.ok(retrySeconds >= 0 && retrySeconds <= RETRY_SECONDS_MAX, `docs/OPERATIONS.md:${block.line}: retry=${retrySeconds}`);
    const deadline = Date.now() + retrySeconds * 1000;
    for (;;) {
      const result = await this.runBlock(block);
      const output = `${result.stdout}\n${result.stderr}`;
      if (process.env["NEWCOMER_TRACE"] === "1") process.stderr.write(`=== ${block.line} ${machine.name}\n${describeResult(result)}\n`);
      const exitOk = fails === undefined ? result.code === 0 : result.code !== 0 && !result.timedOut;
      if (exitOk && (pattern === undefined || pattern.test(output))) return;
      if (Date.now() >= deadline) {
        const why = !exitOk ? (fails === undefined ? "failed" : "succeeded, but the document says it fails") : `printed no match for ${String(pattern)}`;
        assert.fail(`docs/OPERATIONS.md:${block.line} on ${machine.name} ${why}:\n${block.text}\n${describeResult(result)}\n${this.serviceLogs()}`);
      }
      await new Promise((resolve) => setTimeout(resolve, RETRY_INTERVAL_MS));
    }
  }

  serviceKey(machine: string, service: string): string {
    return `${machine}/${service}`;
  }

  define(block: Block): void {
    const name = block.directive.attrs["service"];
    assert.ok(name !== undefined && block.directive.attrs["ready"] !== undefined, `docs/OPERATIONS.md:${block.line}: service= and ready= go together`);
    this.services.set(this.serviceKey(block.directive.machine, name), { block });
  }

  async systemd(block: Block): Promise<void> {
    for (const raw of block.text.split("\n")) {
      const line = raw.replace(/#.*$/, "").trim();
      if (line === "" || /^journalctl\b/.test(line) || line === "systemctl daemon-reload") continue;
      const match = /^systemctl (enable --now|start|restart|stop) (\S+)$/.exec(line);
      assert.ok(match !== null, `docs/OPERATIONS.md:${block.line}: the test does not know what "${line}" does without systemd`);
      const [, action, service = ""] = match;
      const key = this.serviceKey(block.directive.machine, service);
      assert.ok(this.services.has(key), `docs/OPERATIONS.md:${block.line}: ${service} on ${block.directive.machine} has no command line (service=${service}) above`);
      if (action === "stop" || action === "restart") await this.stop(key);
      if (action !== "stop") await this.start(key, block.line);
    }
  }

  async start(key: string, line: number): Promise<void> {
    const service = this.services.get(key);
    assert.ok(service !== undefined);
    assert.equal(service.child, undefined, `docs/OPERATIONS.md:${line}: ${key} is already running`);
    const machine = this.machine(service.block.directive.machine);
    const ready = this.substitute(service.block.directive.attrs["ready"] ?? "", machine);
    const script = this.substitute(service.block.text, machine);
    const log = createWriteStream(join(machine.root, `${key.replace("/", "-")}.log`), { flags: "a" });
    const child = spawn("ip", ["netns", "exec", machine.ns, "bash", "-e", "-o", "pipefail", "-c", script], {
      cwd: join(machine.root, "root"),
      env: { ...process.env, ...this.env(machine) },
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    service.child = child;
    service.exited = new Promise((resolve) => child.once("close", () => resolve()));
    child.stderr?.pipe(log, { end: false });
    let seen = false;
    const started = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`docs/OPERATIONS.md:${service.block.line}: ${key} did not print "${ready}" within ${READY_TIMEOUT_MS} ms\n${this.serviceLogs()}`)), READY_TIMEOUT_MS);
      createInterface({ input: child.stdout! }).on("line", (text) => {
        log.write(`${text}\n`);
        if (!seen && text.includes(ready)) {
          seen = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.once("close", (code, signal) => {
        clearTimeout(timer);
        if (!seen) reject(new Error(`docs/OPERATIONS.md:${service.block.line}: ${key} exited (${code ?? signal}) before printing "${ready}"\n${this.serviceLogs()}`));
      });
    });
    await started;
  }

  async stop(key: string): Promise<void> {
    const service = this.services.get(key);
    const child = service?.child;
    if (service === undefined || child === undefined || child.pid === undefined) return;
    const group = -child.pid;
    const signal = (name: NodeJS.Signals): void => {
      try {
        process.kill(group, name);
      } catch {
        // gone
      }
    };
    if (child.exitCode === null && child.signalCode === null) {
      signal("SIGTERM");
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([service.exited?.then(() => false), new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS)))]);
      clearTimeout(timer);
      if (timedOut === true) {
        signal("SIGKILL");
        await service.exited;
      }
    }
    // The group (bash and what it started) is gone with its leader's exit only if they exited too.
    signal("SIGKILL");
    delete service.child;
    delete service.exited;
  }

  async stopAll(): Promise<void> {
    // Hosts and units before the station, as the document's upgrade order.
    const order = [...this.services.keys()].sort((a, b) => rank(a) - rank(b));
    for (const key of order) await this.stop(key);
  }

  serviceLogs(): string {
    const parts: string[] = [];
    for (const key of this.services.keys()) {
      const machine = this.machine(key.split("/")[0] ?? "");
      const path = join(machine.root, `${key.replace("/", "-")}.log`);
      if (!existsSync(path)) continue;
      const text = readFileSync(path, "utf8");
      parts.push(`--- ${key} (last lines)\n${text.split("\n").slice(-15).join("\n")}`);
    }
    return parts.join("\n");
  }
}

function rank(key: string): number {
  return key.startsWith("host") ? 0 : key.startsWith("unit") ? 1 : 2;
}

test("docs/OPERATIONS.md: every walkthrough block has a directive, every machine and service it names exists", () => {
  const blocks = walkthroughBlocks(readFileSync(DOC, "utf8"));
  assert.ok(blocks.length >= 20, `only ${blocks.length} blocks`);
  for (const machine of Object.keys(MACHINES)) assert.ok(blocks.some((b) => b.directive.machine === machine), `no block runs on ${machine}`);
  assert.throws(() => walkthroughBlocks("<!-- newcomer: begin -->\n```sh\nls\n```\n<!-- newcomer: end -->\n"), /needs a <!-- newcomer/);
  assert.throws(() => parseDirective("<!-- newcomer: mars -->", 1), /unknown machine "mars"/);
});

/** Runs the walkthrough of `markdown` on a fresh four-machine network; throws at the first block that fails. */
async function followWalkthrough(markdown: string): Promise<{ ran: number; blocks: number; ms: number }> {
  const blocks = walkthroughBlocks(markdown);
  const net = await PrivateNetwork.create(Object.keys(MACHINES));
  // Not under /dev/shm: each unit's storage file is a (sparse) 1 GiB file.
  const tmp = makeTempDir("newcomer");
  const walk = new Walkthrough(tmp.path, net);
  const started = Date.now();
  let ran = 0;
  try {
    for (const block of blocks) {
      const { directive } = block;
      if (directive.skip) continue;
      if (directive.attrs["service"] !== undefined) walk.define(block);
      else if (directive.systemd) await walk.systemd(block);
      else await walk.check(block);
      ran += 1;
    }
    return { ran, blocks: blocks.length, ms: Date.now() - started };
  } finally {
    await walk.stopAll();
    await net.destroy();
    tmp.remove();
    assert.deepEqual(await PrivateNetwork.leftovers(net.id), [], "every namespace removed");
  }
}

test("newcomer: docs/OPERATIONS.md followed literally on four machines (network namespaces)", { timeout: 180_000 }, async (t) => {
  const support = await PrivateNetwork.supported();
  if (!support.ok) {
    t.skip(`kernel refuses network namespaces: ${support.why}`);
    return;
  }
  const { ran, blocks, ms } = await followWalkthrough(readFileSync(DOC, "utf8"));
  t.diagnostic(`${ran} blocks of ${blocks} run in ${ms} ms`);
});

test("canary: a wrong command in the document fails the newcomer test at that block", { timeout: 60_000 }, async (t) => {
  const support = await PrivateNetwork.supported();
  if (!support.ok) {
    t.skip(`kernel refuses network namespaces: ${support.why}`);
    return;
  }
  const doc = readFileSync(DOC, "utf8");
  const right = 'IPSAN_STATION_ARGS="--http 192.0.2.10:8640';
  assert.equal(doc.split(right).length, 2, "the station's settings line moved: update the canary");
  const wrong = doc.replace(right, 'IPSAN_STATION_ARGS="--htp 192.0.2.10:8640');
  await assert.rejects(followWalkthrough(wrong), /ipsan-station exited \(2\) before printing "ipsan station ready/);
});
