// What this proves: libiscsi's conformance suite, `iscsi-test-cu --dataloss
// --test=ALL`, run against a real `ipsan unit --iscsi` (plain, with CHAP
// from the host key, and with header digests on every session), has no failures outside the list below (known, each
// with its reason; the list shrinks as the SCSI command set and the transport
// grow), and at least as many tests really pass (not "[SKIPPED]") as at
// this commit (REALLY_PASSED_FLOOR; the goal is more than tgt's 160 on this
// machine, issue 10). The MultipathIO suite runs with two sessions to one LU. The counts are printed; docs/protocol/iscsi.md records them.
// Header digests: iscsi-test-cu always offers HeaderDigest=None,CRC32C (its
// iscsi_context_login sets that after parsing the URL, so a URL's
// ?header_digest=crc32c is overridden) and the target takes the first value
// it allows (RFC 7143 section 6.2); a third pass therefore runs against a
// unit started with --iscsi-require-digest header, which allows CRC32C only,
// and checks from the unit's log that every session had header digests.
// Data digests: libiscsi 1.19 offers DataDigest=None only (lib/login.c), so
// they are proven by the raw initiator (hostile_test) instead.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";
import { chapSecret, iscsiTargetName } from "./names.ts";

/** tgt 1.0.85 under the same suite on this machine: 160 tests really pass (issue 10). */
const TGT_REALLY_PASSED = 160;
/**
 * Tests really passing at this commit (190, one less allowed for the timing of
 * AbortTaskSimpleAsync's race): a floor against regressions, above
 * TGT_REALLY_PASSED. What is skipped is mostly commands not implemented
 * (EXTENDED COPY, WRITE ATOMIC, SANITIZE without --allow-sanitize...).
 */
const REALLY_PASSED_FLOOR = 189;
const SUITE_TIMEOUT_MS = 600_000;

/**
 * Tests that still fail, "Suite.Test" -> why. Every other test must pass.
 * SCSI command-set matters are reported to the scsi side (src/scsi/).
 */
const KNOWN_FAILURES: Readonly<Record<string, string>> = {};

export interface SuiteResult {
  readonly passed: string[];
  readonly skipped: string[];
  readonly failed: string[];
  /** CUnit's own summary: tests run, passed, failed. */
  readonly summary: { run: number; passed: number; failed: number };
}

/** Parses iscsi-test-cu's normal output: "Suite: S", "  Test: T ...", then "passed" or "FAILED". */
export function parseSuiteOutput(text: string): SuiteResult {
  const passed: string[] = [];
  const skipped: string[] = [];
  const failed: string[] = [];
  let suite = "";
  const chunks = text.split(/^(?=Suite: |  Test: )/m);
  for (const chunk of chunks) {
    const suiteMatch = /^Suite: (\S+)/.exec(chunk);
    if (suiteMatch !== null) {
      suite = suiteMatch[1]!;
      continue;
    }
    const testMatch = /^ {2}Test: (\S+) \.\.\./.exec(chunk);
    if (testMatch === null) continue;
    const name = `${suite}.${testMatch[1]}`;
    const firstLine = chunk.split("\n")[0]!;
    if (/^FAILED\s*$/m.test(chunk) || /\.\.\.FAILED\s*$/.test(firstLine)) failed.push(name);
    else if (chunk.includes("[SKIPPED]")) skipped.push(name);
    else passed.push(name);
  }
  const summary = /^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(text);
  return { passed, skipped, failed, summary: { run: Number(summary?.[2] ?? -1), passed: Number(summary?.[3] ?? -1), failed: Number(summary?.[4] ?? -1) } };
}

/** The same URL twice: the suite's MultipathIO tests use two sessions to one logical unit. */
async function runSuite(label: string, url: string): Promise<SuiteResult> {
  // One stream, in order: the suite logs [SKIPPED]/[FAILED] on stderr and CUnit's verdicts on stdout.
  const result = await run("sh", ["-c", 'exec iscsi-test-cu "$@" 2>&1', "sh", "--dataloss", "--test=ALL", url, url], { timeoutMs: SUITE_TIMEOUT_MS });
  const text = result.stdout;
  const parsed = parseSuiteOutput(text);
  // The parser agrees with CUnit's own summary (so a change of output format cannot hide failures).
  assert.equal(parsed.passed.length + parsed.skipped.length + parsed.failed.length, parsed.summary.run, `${label}: parsed ${parsed.passed.length + parsed.skipped.length + parsed.failed.length} tests, CUnit ran ${parsed.summary.run}\n${text.slice(-3000)}`);
  assert.equal(parsed.failed.length, parsed.summary.failed, `${label}: parsed failures ${parsed.failed.join(", ")} vs CUnit's ${parsed.summary.failed}`);
  process.stdout.write(
    `iscsi-test-cu ${label}: ${parsed.summary.run} tests, ${parsed.passed.length} really passed (tgt: ${TGT_REALLY_PASSED}), ${parsed.skipped.length} skipped, ${parsed.failed.length} failed` +
      `${parsed.failed.length > 0 ? ` (${parsed.failed.join(", ")})` : ""}\n`,
  );
  return parsed;
}

function check(label: string, result: SuiteResult): void {
  const unexpected = result.failed.filter((name) => KNOWN_FAILURES[name] === undefined);
  assert.deepEqual(unexpected, [], `${label}: tests that must pass failed: ${unexpected.join(", ")}`);
  assert.ok(result.passed.length >= REALLY_PASSED_FLOOR, `${label}: ${result.passed.length} tests really passed, fewer than the ${REALLY_PASSED_FLOOR} of this commit (tgt: ${TGT_REALLY_PASSED})`);
}

test("parseSuiteOutput reads passed, skipped and failed tests", () => {
  const sample = [
    "Suite: Inquiry",
    "  Test: Standard ...passed",
    "  Test: BlockLimits ...FAILED",
    "    1. test_inquiry_block_limits.c:155  - CU_ASSERT_TRUE(bl->max_unmap <= 1024*1024)",
    "Suite: Reserve6",
    "  Test: LUNReset ...    [FAILED] RESERVE6 command: failed with sense.",
    "passed    [FAILED] PRIN command: failed with sense.",
    "Suite: MultipathIO",
    "  Test: Simple ...    [SKIPPED] Multipath unavailable. Skipping test",
    "passed",
    "  Test: Miscompare ...    [FAILED] COMPAREANDWRITE successful",
    "FAILED",
    "Run Summary:    Type  Total    Ran Passed Failed Inactive",
    "               tests      5      5      3      2        0",
  ].join("\n");
  const parsed = parseSuiteOutput(sample);
  assert.deepEqual(parsed.passed, ["Inquiry.Standard", "Reserve6.LUNReset"]);
  assert.deepEqual(parsed.skipped, ["MultipathIO.Simple"]);
  assert.deepEqual(parsed.failed, ["Inquiry.BlockLimits", "MultipathIO.Miscompare"]);
  assert.deepEqual(parsed.summary, { run: 5, passed: 3, failed: 2 });
});

test("iscsi-test-cu --dataloss --test=ALL: no failures outside the known list, no fewer really passing; with CHAP too", { timeout: 3 * SUITE_TIMEOUT_MS }, async () => {
  const dir = makeTempDir("iscsi-cu", memoryTmpBase());
  const key = randomBytes(32);
  const pskFile = join(dir.path, "keys.psk");
  writeFileSync(pskFile, `host1:${key.toString("hex")}\n`);
  chmodSync(pskFile, 0o600);
  const unit = await startUnit({
    name: "cu",
    capacity: "256M",
    volumes: [
      { name: "plain", size: "64M" },
      { name: "chap", size: "64M" },
    ],
    allow: ["127.0.0.1/32", "id:host1"],
    extraArgs: ["--iscsi", "127.0.0.1:0", "--tls", "on", "--tls-psk", pskFile],
  });
  try {
    const plain = await runSuite("plain", `iscsi://${unit.iscsiPortal}/${iscsiTargetName("cu", "plain")}/0`);
    check("plain", plain);
    const secret = chapSecret(key, "initiator");
    const chap = await runSuite("CHAP", `iscsi://host1%${secret}@${unit.iscsiPortal}/${iscsiTargetName("cu", "chap")}/0`);
    check("CHAP", chap);
    assert.ok(unit.stderr().includes("auth=CHAP identity=host1"), "the CHAP run did not log in with CHAP");
  } finally {
    await unit.close();
    dir.remove();
  }
});

test("iscsi-test-cu --dataloss --test=ALL with header digests (CRC32C) on every session", { timeout: 2 * SUITE_TIMEOUT_MS }, async () => {
  const unit = await startUnit({
    name: "cu",
    capacity: "128M",
    volumes: [{ name: "digest", size: "64M" }],
    allow: ["127.0.0.1/32"],
    extraArgs: ["--iscsi", "127.0.0.1:0", "--iscsi-require-digest", "header"],
  });
  try {
    const digest = await runSuite("header digests", `iscsi://${unit.iscsiPortal}/${iscsiTargetName("cu", "digest")}/0`);
    check("header digests", digest);
    const logins = unit.stderr().match(/session logged in .*type=Normal .*headerDigest=(true|false)/g) ?? [];
    assert.ok(logins.length >= 2, `the unit logged ${logins.length} normal session logins`);
    const without = logins.filter((line) => !line.includes("headerDigest=true"));
    assert.deepEqual(without, [], "sessions logged in without header digests");
  } finally {
    await unit.close();
  }
});
