// The station's audit line for a change is on disk before the change's answer
// leaves (docs/api.md "Audit log"): a real `ipsan station` under strace takes
// a sequence of changes (PUT /api/v1/hosts/hN), and for each answer written to
// the client's socket, the trace must show, before it, the audit line naming
// hN written to DATA/audit.log and an fdatasync (or fsync) of that file that
// returned after the write. Canary: a build without the audit log's fdatasync
// must fail the check (src/testing/patched_build.ts).

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { fetchText } from "../testing/fetch.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { childEnv, waitForExit } from "../testing/process.ts";
import { decodeStraceString, describeLine, parseStraceLog, stringsIn, type Syscall } from "../testing/strace.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { STRACE, straceArgs } from "../testing/traced_unit.ts";
import { IPSAN_BIN, REPO_ROOT, killOnExit } from "../testing/unit.ts";

const CHANGES = 8;
const SYNCS = new Set(["fdatasync", "fsync"]);
const WRITES = new Set(["write", "writev", "pwrite64", "pwritev", "pwritev2"]);

function fdPathOf(call: Syscall): string {
  const raw = call.fdPath ?? "";
  return raw.includes("\\x") ? decodeStraceString(raw).toString("latin1") : raw;
}

function bytesOf(call: Syscall): string {
  return Buffer.concat(call.args.flatMap((a) => stringsIn(a))).toString("latin1");
}

/** Runs the station from `bin` under strace, makes CHANGES changes, answers what the trace shows out of order. */
async function auditBeforeAnswer(bin: string): Promise<string[]> {
  const dir = makeTempDir("audit-order", memoryTmpBase());
  const trace = dir.file("strace.log");
  const data = dir.file("data");
  try {
    const command = straceArgs({ file: trace, syscalls: [...WRITES, ...SYNCS], stringBytes: 400 }, [process.execPath, bin, "station", "--data", data, "--http", "127.0.0.1:0", "--discovery", "127.0.0.1:0"]);
    const child = spawn(STRACE, command, { env: childEnv({ UV_USE_IO_URING: "0" }), stdio: ["ignore", "pipe", "pipe"], detached: true });
    killOnExit(child);
    const url = await new Promise<string>((resolve, reject) => {
      let out = "";
      const timer = setTimeout(() => reject(new Error(`station not ready: ${out}`)), 30_000);
      child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
        out += chunk;
        const m = /ipsan station ready (http:\/\/\S+)/.exec(out);
        if (m !== null) {
          clearTimeout(timer);
          resolve(m[1] ?? "");
        }
      });
      child.once("exit", () => reject(new Error(`station exited: ${out}`)));
    });
    const token = readFileSync(`${data}/admin.token`, "utf8").trim();
    for (let i = 0; i < CHANGES; i++) {
      const { response, text } = await fetchText(
        `${url}/api/v1/hosts/auditee${i}`,
        { method: "PUT", headers: { authorization: `Bearer ${token}`, "content-type": "application/json" }, body: JSON.stringify({ address: "127.0.0.2" }) },
        15_000,
      );
      assert.equal(response.status, 201, text);
    }
    process.kill(-(child.pid ?? 0), "SIGTERM");
    assert.ok(await waitForExit(child, 15_000), "the traced station stops");
    const log = parseStraceLog(readFileSync(trace, "utf8"));
    const calls = [...log.syscalls].sort((a, b) => a.entryLine - b.entryLine);
    const auditWrites = calls.filter((c) => WRITES.has(c.name) && fdPathOf(c).endsWith("audit.log"));
    const auditSyncs = calls.filter((c) => SYNCS.has(c.name) && fdPathOf(c).endsWith("audit.log") && c.ret === 0);
    const answers = calls.filter((c) => WRITES.has(c.name) && fdPathOf(c).startsWith("TCP:") && bytesOf(c).startsWith("HTTP/1.1 201"));
    const problems: string[] = [];
    if (answers.length !== CHANGES) problems.push(`expected ${CHANGES} answers in the trace, found ${answers.length}`);
    for (let i = 0; i < answers.length; i++) {
      const answer = answers[i] as Syscall;
      const write = auditWrites.find((w) => bytesOf(w).includes(`"name":"auditee${i}"`));
      if (write === undefined || write.exitLine >= answer.entryLine) {
        problems.push(`auditee${i}: no audit line written before the answer (${describeLine(log.lines[answer.entryLine])})`);
        continue;
      }
      const synced = auditSyncs.some((s) => s.entryLine > write.exitLine && s.exitLine < answer.entryLine);
      if (!synced) problems.push(`auditee${i}: the answer went out before an fdatasync of audit.log after its line (${describeLine(log.lines[write.entryLine])})`);
    }
    return problems;
  } finally {
    dir.remove();
  }
}

test("every change's audit line is written and fdatasync'd before its answer is sent", { timeout: 90_000 }, async () => {
  assert.deepEqual(await auditBeforeAnswer(IPSAN_BIN), []);
});

test("canary: a station whose audit log is not fdatasync'd fails the check", { timeout: 90_000 }, async () => {
  const build = patchedBuild("audit-sync-canary", [{ file: "dist/station/auth/audit.js", from: "await this.#handle.datasync();", to: "" }], REPO_ROOT, { nodeModules: true });
  try {
    const problems = await auditBeforeAnswer(build.ipsanBin);
    assert.equal(problems.length, CHANGES, problems.join("\n"));
  } finally {
    build.remove();
  }
});
