// Who may do what on the station's API (issue 7 items 3, 5, 6, 7), against a
// real `bin/ipsan station` with a real unit joined, through real HTTP and the
// real CLI:
// - the role matrix: a viewer reads and is refused every change (403 naming
//   the role); an operator changes the pool but cannot manage tokens, join
//   tokens or the audit log; a revoked token is refused at once; lists, the
//   audit log and events never hold a secret;
// - join tokens: one use, for the host named, refused after expiry, good for
//   nothing but registration;
// - a host credential sees and acts on its own records only: another host's
//   assignment cannot be read, released or reported on, no host's address can
//   be moved by it, no token made (crossHostViolations, with its canary: a
//   station whose assignment check is patched out must fail it);
// - `ipsan host register` stores the credential (0600) and request/release
//   then need only --state-dir; `ipsan tokens` and `ipsan hosts token create`;
// - the audit log: every change and every refusal, chained; `ipsan audit
//   verify` names the first edited, dropped or swapped line and exits 1 (with
//   its canary: a build whose verify skips the chain checks must fail that);
// - HTTPS: the CLI trusts the station's self-signed certificate given by
//   --ca-file or $IPSAN_CA_FILE, and refuses it without.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { patchedBuild } from "../testing/patched_build.ts";
import { run, runOk, sleep } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, REPO_ROOT, type RunningUnit } from "../testing/unit.ts";
import { AuditLog, GENESIS_HASH, entryHash, verifyAudit } from "./auth/audit.ts";
import { HOST_SUBTREE, PERMISSIONS, authorize, permissionFor } from "./auth/permissions.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { startJoinedUnit } from "./pool_harness.ts";

let station: RunningStation;
let unit: RunningUnit;
let tmp: TempDir;
/** Every secret the tests saw: none may appear in lists, the audit log or events. */
const secrets: string[] = [];

before(async () => {
  tmp = makeTempDir("auth", memoryTmpBase());
  station = await startStation();
  unit = await startJoinedUnit(station, { name: "u1", capacity: "256M" });
});
after(async () => {
  await unit?.close();
  await station?.close();
  tmp?.remove();
});

const ipsan = (args: readonly string[], env: Record<string, string> = {}) => run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 30_000, env });

async function makeToken(target: RunningStation, name: string, role: string): Promise<string> {
  const created = await target.api("POST", "/api/v1/tokens", { name, role });
  assert.equal(created.status, 201, created.text);
  const secret = (created.body as { token: string }).token;
  secrets.push(secret);
  return secret;
}

/** Registers `host` at `address` with a fresh join token; answers its host credential. */
async function registerHost(target: RunningStation, host: string, address: string): Promise<string> {
  const join = await target.api("POST", "/api/v1/join-tokens", { host });
  assert.equal(join.status, 201, join.text);
  const joinSecret = (join.body as { token: string }).token;
  secrets.push(joinSecret);
  const registered = await target.api("POST", `/api/v1/hosts/${host}/register`, { address }, { token: joinSecret });
  assert.ok(registered.status === 201 || registered.status === 200, registered.text);
  const credential = (registered.body as { token: string }).token;
  secrets.push(credential);
  return credential;
}

function denied(response: { status: number; body: unknown; text: string }, role: string, what: string): void {
  assert.equal(response.status, 403, `${what}: ${response.text}`);
  assert.equal(errorOf(response.body).code, "PERMISSION_DENIED", what);
  assert.match(errorOf(response.body).message ?? "", new RegExp(`role ${role}\\b`), `${what}: the message names the role`);
}

test("role matrix: viewer reads only, operator cannot manage tokens, a revoked token is refused at once", async () => {
  const viewer = await makeToken(station, "matrix-viewer", "viewer");
  const operator = await makeToken(station, "matrix-operator", "operator");
  for (const path of ["/api/v1/units", "/api/v1/volumes", "/api/v1/hosts", "/api/v1/assignments", "/api/v1/health", "/metrics"]) {
    assert.equal((await station.api("GET", path, undefined, { token: viewer })).status, 200, `viewer GET ${path}`);
  }
  const changes: [string, string, unknown][] = [
    ["POST", "/api/v1/volumes", { unit: "u1", name: "vv", sizeBytes: "1M" }],
    ["PUT", "/api/v1/hosts/hv", { address: "127.0.0.9" }],
    ["POST", "/api/v1/allocations", { requestId: "rv", host: "hv", sizeBytes: "1M" }],
    ["DELETE", "/api/v1/assignments/a1", undefined],
    ["POST", "/api/v1/tokens", { name: "x", role: "admin" }],
    ["GET", "/api/v1/tokens", undefined],
  ];
  for (const [method, path, body] of changes) denied(await station.api(method, path, body, { token: viewer }), "viewer", `viewer ${method} ${path}`);
  const adminOnly: [string, string, unknown][] = [
    ["POST", "/api/v1/tokens", { name: "escalate", role: "admin" }],
    ["GET", "/api/v1/tokens", undefined],
    ["DELETE", "/api/v1/tokens/matrix-viewer", undefined],
    ["POST", "/api/v1/join-tokens", {}],
    ["GET", "/api/v1/audit", undefined],
    ["GET", "/api/v1/audit/verify", undefined],
  ];
  for (const [method, path, body] of adminOnly) denied(await station.api(method, path, body, { token: operator }), "operator", `operator ${method} ${path}`);
  const made = await station.api("POST", "/api/v1/volumes", { unit: "u1", name: "opvol", sizeBytes: "1M" }, { token: operator });
  assert.equal(made.status, 201, `an operator changes the pool: ${made.text}`);
  assert.equal((await station.api("DELETE", "/api/v1/volumes/u1/opvol", undefined, { token: operator })).status, 204);

  // Listed without secrets; a bad role or name is a 400 naming the field.
  const list = await station.api("GET", "/api/v1/tokens");
  assert.equal(list.status, 200);
  const names = (list.body as { items: { name: string; role: string; token?: unknown }[] }).items;
  assert.ok(names.some((t) => t.name === "matrix-viewer" && t.role === "viewer" && t.token === undefined));
  for (const secret of secrets) assert.ok(!list.text.includes(secret), "no secret in the token list");
  assert.equal(errorOf((await station.api("POST", "/api/v1/tokens", { name: "r", role: "root" })).body).field, "role");
  assert.equal(errorOf((await station.api("POST", "/api/v1/tokens", { name: "bad name", role: "viewer" })).body).field, "name");
  assert.equal((await station.api("POST", "/api/v1/tokens", { name: "matrix-viewer", role: "viewer" })).status, 409);
  assert.equal((await station.api("DELETE", "/api/v1/tokens/admin")).status, 409, "DATA/admin.token is not revoked through the API");

  // The viewer's open event stream ends when its token is revoked.
  const abort = new AbortController();
  const stream = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${viewer}` }, signal: abort.signal });
  assert.equal(stream.status, 200);
  const reader = stream.body?.getReader();
  await reader?.read();
  assert.equal((await station.api("DELETE", "/api/v1/tokens/matrix-viewer")).status, 204);
  const ended = setTimeout(() => abort.abort(), 5_000);
  try {
    for (;;) if ((await reader?.read())?.done !== false) break;
  } finally {
    clearTimeout(ended);
  }
  assert.equal(abort.signal.aborted, false, "the stream ended at the revocation, not at the test's deadline");
  const after = await station.api("GET", "/api/v1/units", undefined, { token: viewer });
  assert.equal(after.status, 401, "revoked: refused at once");
  assert.equal(errorOf(after.body).code, "UNAUTHENTICATED");
  assert.equal((await station.api("DELETE", "/api/v1/tokens/matrix-viewer")).status, 404);
});

test("join tokens: for the host named, once, until they expire, and for nothing but registration", async () => {
  const join = await station.api("POST", "/api/v1/join-tokens", { host: "j1", expires: "1h" });
  assert.equal(join.status, 201, join.text);
  const secret = (join.body as { token: string; name: string; expiresAt: string }).token;
  secrets.push(secret);
  denied(await station.api("GET", "/api/v1/units", undefined, { token: secret }), "join", "a join token reads nothing");
  denied(await station.api("POST", "/api/v1/hosts/j2/register", {}, { token: secret }), "join", "a join token for j1 registers j1 only");
  const first = await station.api("POST", "/api/v1/hosts/j1/register", { address: "127.0.0.21" }, { token: secret });
  assert.equal(first.status, 201, first.text);
  const answer = first.body as { host: { name: string; address: string }; credential: { name: string; role: string }; token: string };
  secrets.push(answer.token);
  assert.deepEqual([answer.host.name, answer.host.address, answer.credential.name, answer.credential.role], ["j1", "127.0.0.21", "host:j1", "host"]);
  const again = await station.api("POST", "/api/v1/hosts/j1/register", {}, { token: secret });
  assert.equal(again.status, 401, "used once");
  assert.match(errorOf(again.body).message ?? "", /already used/);

  const short = await station.api("POST", "/api/v1/join-tokens", { expires: "100ms" });
  const shortSecret = (short.body as { token: string }).token;
  secrets.push(shortSecret);
  await sleep(300);
  const late = await station.api("POST", "/api/v1/hosts/j3/register", {}, { token: shortSecret });
  assert.equal(late.status, 401, "expired");
  assert.match(errorOf(late.body).message ?? "", /expired/);
  assert.equal(errorOf((await station.api("POST", "/api/v1/join-tokens", { expires: "5" })).body).field, "expires", "a bare number is refused");
  assert.equal(errorOf((await station.api("POST", "/api/v1/join-tokens", { expires: "30d" })).body).field, "expires");
});

interface Seen {
  readonly status: number;
  readonly text: string;
}

/**
 * What a host credential must not do to another host (h2) nor to its own
 * address; answers every violation found (empty: the station confines it).
 */
async function crossHostViolations(target: RunningStation): Promise<string[]> {
  const h1 = await registerHost(target, "h1", "127.0.0.2");
  const h2 = await registerHost(target, "h2", "127.0.0.3");
  const mine = await target.api("POST", "/api/v1/allocations", { requestId: "h1-own", host: "h1", sizeBytes: "4M" }, { token: h1 });
  const theirs = await target.api("POST", "/api/v1/allocations", { requestId: "h2-own", host: "h2", sizeBytes: "4M" }, { token: h2 });
  assert.equal(mine.status, 201, mine.text);
  assert.equal(theirs.status, 201, theirs.text);
  const other = theirs.body as { id: string; uri: string; volume: string };
  const violations: string[] = [];
  const mustRefuse = async (what: string, method: string, path: string, body?: unknown): Promise<Seen> => {
    const response = await target.api(method, path, body, { token: h1 });
    if (response.status !== 403 || !/role host/.test(errorOf(response.body).message ?? "")) violations.push(`${what}: ${response.status} ${response.text.slice(0, 200)}`);
    if (response.text.includes(other.uri) || response.text.includes(other.volume)) violations.push(`${what}: the answer shows h2's assignment`);
    return response;
  };
  await mustRefuse("read h2's assignment", "GET", `/api/v1/assignments/${other.id}`);
  await mustRefuse("release h2's assignment", "DELETE", `/api/v1/assignments/${other.id}`);
  await mustRefuse("report h2's legs", "PUT", `/api/v1/assignments/${other.id}/legs`, { generation: 1, legs: [] });
  await mustRefuse("list h2's assignments", "GET", "/api/v1/assignments?host=h2");
  await mustRefuse("list every host's assignments", "GET", "/api/v1/assignments");
  await mustRefuse("allocate for h2", "POST", "/api/v1/allocations", { requestId: "steal", host: "h2", sizeBytes: "4M" });
  await mustRefuse("move its own address", "PUT", "/api/v1/hosts/h1", { address: "127.0.0.9" });
  await mustRefuse("move its address by heartbeat", "POST", "/api/v1/hosts/h1/heartbeat", { address: "127.0.0.9" });
  await mustRefuse("move h2's address", "PUT", "/api/v1/hosts/h2", { address: "127.0.0.2" });
  await mustRefuse("move its address by allocation", "POST", "/api/v1/allocations", { requestId: "moveme", host: "h1", sizeBytes: "4M", address: "127.0.0.9" });
  await mustRefuse("heartbeat as h2", "POST", "/api/v1/hosts/h2/heartbeat", {});
  await mustRefuse("make a token", "POST", "/api/v1/tokens", { name: "mine", role: "admin" });
  await mustRefuse("make a join token", "POST", "/api/v1/join-tokens", {});
  await mustRefuse("register another host", "POST", "/api/v1/hosts/h3/register", {});
  await mustRefuse("read the pool", "GET", "/api/v1/units");
  await mustRefuse("read the event stream", "GET", "/api/v1/events");
  await mustRefuse("assign by hand", "POST", "/api/v1/assignments", { host: "h1", unit: "u1", volume: other.volume });
  // h2's assignment is untouched, and h2 still holds it.
  const still = await target.api("GET", `/api/v1/assignments/${other.id}`);
  if ((still.body as { host?: string; state?: string }).host !== "h2") violations.push(`h2's assignment changed hands: ${still.text}`);
  const h2Host = await target.api("GET", "/api/v1/hosts/h2");
  if ((h2Host.body as { address?: string }).address !== "127.0.0.3") violations.push(`h2's address moved: ${h2Host.text}`);
  const h1Host = await target.api("GET", "/api/v1/hosts/h1");
  if ((h1Host.body as { address?: string }).address !== "127.0.0.2") violations.push(`h1's address moved: ${h1Host.text}`);
  return violations;
}

test("a host credential acts on its own records only (and its own work is not refused)", { timeout: 60_000 }, async () => {
  assert.deepEqual(await crossHostViolations(station), []);
  const h1 = await registerHost(station, "h1", "127.0.0.2"); // registering again: a new credential, the old one revoked
  const own = await station.api("GET", "/api/v1/assignments?host=h1", undefined, { token: h1 });
  assert.equal(own.status, 200, own.text);
  const items = (own.body as { items: { id: string; host: string }[] }).items;
  assert.ok(items.length === 1 && items.every((a) => a.host === "h1"), own.text);
  const id = items[0]?.id ?? "";
  assert.equal((await station.api("GET", `/api/v1/assignments/${id}`, undefined, { token: h1 })).status, 200);
  assert.equal((await station.api("GET", "/api/v1/hosts/h1", undefined, { token: h1 })).status, 200);
  assert.equal((await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.2", spare: false }, { token: h1 })).status, 200, "same address, spare flag: allowed");
  assert.equal((await station.api("POST", "/api/v1/hosts/h1/heartbeat", {}, { token: h1 })).status, 204);
  const released = await station.api("DELETE", `/api/v1/assignments/${id}`, undefined, { token: h1 });
  assert.ok(released.status === 204 || released.status === 202, released.text);
  // An admin acts for any host.
  const h2List = await station.api("GET", "/api/v1/assignments?host=h2");
  assert.equal((h2List.body as { items: unknown[] }).items.length, 1);
});

test("the permission table: a host's own /api/v1/hosts/H/... routes (its keys, and any route added later) admit that host and the admin only", () => {
  assert.equal(permissionFor("GET", "/api/v1/hosts/:name/later"), HOST_SUBTREE);
  assert.deepEqual(permissionFor("GET", "/api/v1/hosts/:name/keys"), HOST_SUBTREE);
  const request = (host: string) => ({
    method: "GET",
    route: "/api/v1/hosts/:name/keys",
    params: [host],
    query: new URLSearchParams(),
    body: undefined,
    callerAddress: "127.0.0.2",
    assignmentHost: () => undefined,
    hostAddress: () => "127.0.0.2",
  });
  authorize({ name: "host:h1", role: "host", host: "h1" }, request("h1"));
  authorize({ name: "admin", role: "admin", host: null }, request("h2"));
  assert.throws(() => authorize({ name: "host:h1", role: "host", host: "h1" }, request("h2")), /role host .* may not/);
  assert.throws(() => authorize({ name: "ops", role: "operator", host: null }, request("h1")), /role operator \(token ops\) may not/);
  assert.throws(() => authorize({ name: "v", role: "viewer", host: null }, request("h1")), /role viewer/);
  assert.equal(permissionFor("POST", "/api/v1/something/new").roles.join(), "admin", "an unlisted route is the admin's only");
});

test("every route the OpenAPI document lists has its own line in the permission table", async () => {
  const doc = (await station.api("GET", "/api/v1/openapi.json")).body as { paths: Record<string, Record<string, unknown>> };
  const table = new Set(Object.keys(PERMISSIONS).map((k) => k.replace(/:[a-z]+/g, ":")));
  const missing: string[] = [];
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const method of Object.keys(methods)) {
      const key = `${method.toUpperCase()} ${path.replace(/\{[^}]+\}/g, ":")}`;
      if (!table.has(key)) missing.push(key);
    }
  }
  assert.deepEqual(missing, []);
});

test("CLI: tokens create/list/revoke, hosts token create, host register then request/release with --state-dir alone", { timeout: 60_000 }, async () => {
  const common = ["--station", station.url, "--token-file", join(station.dataDir, "admin.token")];
  const created = await ipsan(["tokens", "create", "--name", "cli-viewer", "--role", "viewer", ...common]);
  assert.equal(created.code, 0, created.stderr);
  const secret = created.stdout.trim();
  secrets.push(secret);
  assert.match(created.stderr, /shown this once/);
  writeFileSync(tmp.file("viewer.token"), `${secret}\n`, { mode: 0o600 });
  const listed = await ipsan(["tokens", "list", ...common]);
  assert.match(listed.stdout, /cli-viewer\s+token\s+viewer/);
  assert.ok(!listed.stdout.includes(secret));
  const refused = await ipsan(["volume", "create", "u1", "x", "1M", "--station", station.url, "--token-file", tmp.file("viewer.token")]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /403 PERMISSION_DENIED: role viewer \(token cli-viewer\) may not POST \/api\/v1\/volumes/);
  assert.equal((await ipsan(["tokens", "create", "--name", "y", "--role", "root", ...common])).code, 2);
  assert.equal((await ipsan(["tokens", "revoke", "cli-viewer", ...common])).code, 0);
  assert.equal((await ipsan(["units", "--station", station.url, "--token-file", tmp.file("viewer.token")])).code, 1, "revoked");

  const badExpiry = await ipsan(["hosts", "token", "create", "--expires", "10", ...common]);
  assert.equal(badExpiry.code, 2);
  assert.match(badExpiry.stderr, /--expires: invalid duration "10"/);
  const joinAnswer = await ipsan(["hosts", "token", "create", "--host", "cli1", "--expires", "10m", "--json", ...common]);
  assert.equal(joinAnswer.code, 0, joinAnswer.stderr);
  const joinSecret = (JSON.parse(joinAnswer.stdout) as { token: string }).token;
  secrets.push(joinSecret);
  writeFileSync(tmp.file("join.token"), `${joinSecret}\n`, { mode: 0o600 });
  const stateDir = tmp.file("cli1-state");
  const registered = await ipsan(["host", "register", "--station", station.url, "--token-file", tmp.file("join.token"), "--host", "cli1", "--address", "127.0.0.31", "--state-dir", stateDir]);
  assert.equal(registered.code, 0, registered.stderr);
  const credentialFile = join(stateDir, "credential.json");
  assert.equal(statSync(credentialFile).mode & 0o777, 0o600);
  const stored = JSON.parse(readFileSync(credentialFile, "utf8")) as { host: string; address: string; token: string };
  assert.deepEqual([stored.host, stored.address], ["cli1", "127.0.0.31"]);
  secrets.push(stored.token);
  const reused = await ipsan(["host", "register", "--station", station.url, "--token-file", tmp.file("join.token"), "--host", "cli1", "--state-dir", tmp.file("other")]);
  assert.equal(reused.code, 1, "the join token was used");

  const requested = await ipsan(["host", "request", "--state-dir", stateDir, "--size", "4M", "--json"]);
  assert.equal(requested.code, 0, requested.stderr);
  const assignment = JSON.parse(requested.stdout) as { id: string; host: string };
  assert.equal(assignment.host, "cli1");
  const foreign = await ipsan(["host", "request", "--state-dir", stateDir, "--host", "cli2", "--size", "4M"]);
  assert.equal(foreign.code, 2, "the stored credential is cli1's: another --host needs its own --token-file");
  const released = await ipsan(["host", "release", "--state-dir", stateDir, "--assignment", assignment.id, "--json"]);
  assert.equal(released.code, 0, released.stderr);
  // The admin token keeps working with the same state dir (flags win).
  const asAdmin = await ipsan(["host", "request", "--state-dir", stateDir, ...common, "--host", "cli2", "--size", "4M", "--dry-run"]);
  assert.equal(asAdmin.code, 0, asAdmin.stderr);
});

/** Runs `ipsan audit verify --file` (from `bin`) on the log with one tampering applied; answers exit code and output. */
async function verifyTampered(bin: string, lines: string[], tamper: (lines: string[]) => string[], name: string) {
  const file = tmp.file(`audit-${name}.log`);
  writeFileSync(file, `${tamper([...lines]).join("\n")}\n`);
  return run(process.execPath, [bin, "audit", "verify", "--file", file], { timeoutMs: 20_000 });
}

const TAMPERINGS: [string, (lines: string[]) => string[]][] = [
  ["edit", (l) => l.map((x, i) => (i === 2 ? x.replace(/"actor":"[^"]*"/, '"actor":"mallory"') : x))],
  ["drop", (l) => l.filter((_, i) => i !== 2)],
  ["swap", (l) => [l[0] ?? "", l[1] ?? "", l[3] ?? "", l[2] ?? "", ...l.slice(4)]],
];

test("audit log: every change and refusal, chained and secret-free; verify names the first edited, dropped or swapped line", { timeout: 60_000 }, async () => {
  const online = await station.api("GET", "/api/v1/audit/verify");
  assert.equal(online.status, 200);
  assert.equal((online.body as { ok: boolean }).ok, true, online.text);
  const path = join(station.dataDir, "audit.log");
  const text = readFileSync(path, "utf8");
  for (const secret of secrets) assert.ok(!text.includes(secret), "no secret in the audit log");
  const entries = text.trim().split("\n").map((l) => JSON.parse(l) as { seq: number; actor: string; role: string; action: string; ids: Record<string, string>; status: number; from: string });
  assert.ok(entries.some((e) => e.actor === "-" && e.status === 401), "a refused credential is recorded");
  assert.ok(entries.some((e) => e.role === "viewer" && e.status === 403 && e.action === "POST /api/v1/volumes"), "a viewer's refused change is recorded");
  assert.ok(entries.some((e) => e.actor === "host:h1" && e.action === "DELETE /api/v1/assignments/:id" && e.status === 403), "a host's refused release of another's assignment");
  assert.ok(entries.some((e) => e.actor === "admin" && e.action === "DELETE /api/v1/tokens/:name" && e.ids["name"] === "matrix-viewer" && e.status === 204));
  assert.ok(entries.every((e) => e.from === "127.0.0.1" || e.from === ""), "from: the caller's address");
  assert.ok(!entries.some((e) => e.action.startsWith("GET ") && e.status < 400), "reads are not audited");
  const listed = await ipsan(["audit", "list", "--limit", "3", "--json", "--station", station.url, "--token-file", join(station.dataDir, "admin.token")]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.equal((JSON.parse(listed.stdout) as { items: unknown[] }).items.length, 3);
  const cli = await ipsan(["audit", "verify", "--station", station.url, "--token-file", join(station.dataDir, "admin.token")]);
  assert.equal(cli.code, 0, cli.stdout + cli.stderr);
  assert.match(cli.stdout, /chain intact/);

  const lines = text.trim().split("\n");
  assert.ok(lines.length >= 6);
  assert.equal((await run(process.execPath, [IPSAN_BIN, "audit", "verify", "--file", path])).code, 0);
  for (const [name, tamper] of TAMPERINGS) {
    const result = await verifyTampered(IPSAN_BIN, lines, tamper, name);
    assert.equal(result.code, 1, `${name}: ${result.stdout}${result.stderr}`);
    assert.match(result.stdout, /BROKEN at line 3 \(seq [34]\)/, `${name}: names the first bad line`);
  }
});

test("canary: a verify without the chain checks passes a tampered log (so the audit test can fail)", { timeout: 60_000 }, async () => {
  const lines = readFileSync(join(station.dataDir, "audit.log"), "utf8").trim().split("\n");
  const build = patchedBuild("auth-audit-canary", [
    { file: "dist/station/auth/audit.js", from: "if (entry.seq !== prev.seq + 1)", to: "if (false)" },
    { file: "dist/station/auth/audit.js", from: "if (entry.prev !== prev.hash)", to: "if (false)" },
    { file: "dist/station/auth/audit.js", from: "if (entryHash(entry) !== entry.hash)\n            return bad(", to: "if (false)\n            return bad(" },
  ]);
  try {
    const passed: string[] = [];
    for (const [name, tamper] of TAMPERINGS) if ((await verifyTampered(build.ipsanBin, lines, tamper, `canary-${name}`)).code === 0) passed.push(name);
    assert.deepEqual(passed, ["edit", "drop", "swap"], "the broken verify misses every tampering");
  } finally {
    build.remove();
  }
});

test("canary: a station that lets a host touch another host's assignment fails crossHostViolations", { timeout: 90_000 }, async () => {
  const build = patchedBuild("auth-host-canary", [{ file: "dist/station/auth/permissions.js", from: "if (holder !== undefined && holder !== own)", to: "if (false)" }], REPO_ROOT, { nodeModules: true });
  const broken = await startStation({ bin: build.ipsanBin });
  const brokenUnit = await startJoinedUnit(broken, { name: "u1", capacity: "128M" });
  try {
    const violations = await crossHostViolations(broken);
    assert.ok(violations.some((v) => v.startsWith("read h2's assignment")), violations.join("\n"));
    assert.ok(violations.some((v) => v.startsWith("release h2's assignment")), violations.join("\n"));
  } finally {
    await brokenUnit.close();
    await broken.close();
    build.remove();
  }
});

test("audit log file: injected clock, torn last line dropped and noted, a tampered last line stops the station", async () => {
  const path = tmp.file("unit-audit.log");
  let now = Date.parse("2026-01-02T03:04:05.000Z");
  const clock = { nowMs: () => now };
  const log = await AuditLog.open(path, clock);
  const first = await log.append({ actor: "a", role: "admin", action: "POST /x", ids: {}, from: "127.0.0.1", status: 201 });
  now += 1000;
  await log.append({ actor: "a", role: "admin", action: "POST /y", ids: { id: "1" }, from: "127.0.0.1", status: 200 });
  await log.close();
  assert.equal(first.time, "2026-01-02T03:04:05.000Z");
  assert.equal(first.prev, GENESIS_HASH);
  const { seq: _s, hash: _h, ...rest } = first;
  assert.equal(entryHash({ seq: 1, ...rest }), first.hash);
  // A crash in the middle of an append: the last line lacks its end.
  const torn = '{"seq":3,"time":"2026';
  writeFileSync(path, `${readFileSync(path, "utf8")}${torn}`);
  const reopened = await AuditLog.open(path, clock);
  assert.equal(reopened.head.seq, 3, "the torn line is dropped and an entry says so");
  await reopened.close();
  const lines = readFileSync(path, "utf8").trim().split("\n");
  assert.equal(lines.length, 3);
  assert.ok((lines[2] ?? "").includes(`"action":"audit.torn-tail-dropped","ids":{"bytes":"${torn.length}"}`), lines[2]);
  assert.equal((await verifyAudit(lines)).ok, true);
  // A complete last line that does not match its hash: not a crash; the station refuses to start on it.
  writeFileSync(path, `${[...lines.slice(0, 2), (lines[2] ?? "").replace('"actor":"station"', '"actor":"mallory"')].join("\n")}\n`);
  await assert.rejects(AuditLog.open(path, clock), /does not match its hash/);
});

test("HTTPS: the CLI trusts the station's certificate from --ca-file or $IPSAN_CA_FILE, and refuses it without", { timeout: 60_000 }, async () => {
  const cert = tmp.file("cert.pem");
  const key = tmp.file("key.pem");
  await runOk("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], { timeoutMs: 30_000 });
  const secure = await startStation({ extraArgs: ["--tls-cert", cert, "--tls-key", key] });
  try {
    assert.match(secure.url, /^https:\/\//);
    const common = ["--station", secure.url, "--token-file", join(secure.dataDir, "admin.token")];
    const withCa = await ipsan(["units", ...common, "--ca-file", cert, "--json"]);
    assert.equal(withCa.code, 0, withCa.stderr);
    const withEnv = await ipsan(["hosts", ...common], { IPSAN_CA_FILE: cert });
    assert.equal(withEnv.code, 0, withEnv.stderr);
    const without = await ipsan(["units", ...common]);
    assert.equal(without.code, 1);
    assert.match(without.stderr, /unreachable .*(SELF_SIGNED|self-signed|certificate)/i);
    const plain = await ipsan(["units", "--station", secure.url.replace("https:", "http:"), "--token-file", join(secure.dataDir, "admin.token")]);
    assert.equal(plain.code, 1, "plain HTTP to the HTTPS port does not work");
    assert.equal((await ipsan(["station", "--data", tmp.file("x"), "--tls-cert", cert])).code, 2, "--tls-cert needs --tls-key");
  } finally {
    await secure.close();
  }
});

test("audit log file: concurrent appends go out in batches, chained in call order, each resolved once on disk", async () => {
  const path = tmp.file("batch-audit.log");
  const log = await AuditLog.open(path);
  const entries = await Promise.all(Array.from({ length: 200 }, (_, i) => log.append({ actor: `a${i}`, role: "admin", action: "POST /x", ids: {}, from: "", status: 200 })));
  assert.deepEqual(entries.map((e) => e.seq), Array.from({ length: 200 }, (_, i) => i + 1));
  assert.deepEqual(entries.map((e) => e.actor), Array.from({ length: 200 }, (_, i) => `a${i}`));
  const more = await log.append({ actor: "late", role: "admin", action: "POST /y", ids: {}, from: "", status: 200 });
  assert.equal(more.seq, 201);
  await log.close();
  const lines = readFileSync(path, "utf8").trim().split("\n");
  assert.equal(lines.length, 201);
  const verdict = await verifyAudit(lines);
  assert.equal(verdict.ok, true);
});

test("audit log: the running station's verify catches a file cut short (an offline verify cannot)", { timeout: 60_000 }, async () => {
  const own = await startStation();
  try {
    for (const name of ["c1", "c2", "c3"]) assert.equal((await own.api("PUT", `/api/v1/hosts/${name}`, { address: "127.0.0.2" })).status, 201);
    const path = join(own.dataDir, "audit.log");
    const lines = readFileSync(path, "utf8").trim().split("\n");
    assert.equal(lines.length, 3);
    writeFileSync(path, `${lines.slice(0, 2).join("\n")}\n`);
    const verdict = (await own.api("GET", "/api/v1/audit/verify")).body as { ok: boolean; line: number; reason: string };
    assert.equal(verdict.ok, false);
    assert.equal(verdict.line, 3);
    assert.match(verdict.reason, /cut off the end/);
    const cli = await ipsan(["audit", "verify", "--station", own.url, "--token-file", join(own.dataDir, "admin.token")]);
    assert.equal(cli.code, 1);
    assert.match(cli.stdout, /BROKEN at line 3/);
    assert.equal((await ipsan(["audit", "verify", "--file", path])).code, 0, "offline, a clean cut is not visible (docs/security.md)");
  } finally {
    await own.close();
  }
});
