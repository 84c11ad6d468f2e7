// The console's static files on a real station: served at / and /assets/*
// without a token, from --console-dir; no directory listing, nothing outside
// the directory (.., encoded .., a symbolic link out, hidden files), and every
// /api/v1 path still needs the token. Without a built console, / says how to build it.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { startStation, type RunningStation } from "../harness.ts";
import { CONSOLE_FILE_BYTES_MAX } from "./limits.ts";

const INDEX = "<!doctype html><title>ipsan console</title><div id=app></div>\n";
const SCRIPT = "console.log('ipsan');\n";

let tmp: TempDir;
let station: RunningStation;

before(async () => {
  tmp = makeTempDir("console-static", memoryTmpBase());
  const dir = join(tmp.path, "console");
  mkdirSync(join(dir, "assets", "nested"), { recursive: true });
  writeFileSync(join(dir, "index.html"), INDEX);
  writeFileSync(join(dir, "assets", "index-abc123.js"), SCRIPT);
  writeFileSync(join(dir, "assets", "nested", "deep.css"), "body{}\n");
  writeFileSync(join(dir, "favicon.svg"), "<svg xmlns='http://www.w3.org/2000/svg'/>\n");
  writeFileSync(join(dir, ".env"), "SECRET=1\n");
  writeFileSync(join(dir, "assets", "huge.js"), Buffer.alloc(CONSOLE_FILE_BYTES_MAX + 1, 0x20));
  writeFileSync(join(tmp.path, "outside.txt"), "outside the console dir\n");
  symlinkSync(join(tmp.path, "outside.txt"), join(dir, "assets", "escape.txt"));
  station = await startStation({ extraArgs: ["--console-dir", dir] });
});
after(async () => {
  await station?.close();
  tmp?.remove();
});

/** A GET with the path sent exactly as given (fetch would normalize `..`), without a token. */
function rawGet(path: string): Promise<{ status: number; type: string; cache: string; body: string }> {
  const url = new URL(station.url);
  return new Promise((resolve, reject) => {
    const req = request({ host: url.hostname, port: url.port, path, method: "GET", timeout: 10_000 }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (body += chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, type: String(res.headers["content-type"] ?? ""), cache: String(res.headers["cache-control"] ?? ""), body }));
    });
    req.on("timeout", () => req.destroy(new Error(`GET ${path} timed out`)));
    req.on("error", reject);
    req.end();
  });
}

test("/, /assets/* and top-level files are served without a token", async () => {
  const index = await rawGet("/");
  assert.equal(index.status, 200);
  assert.match(index.type, /^text\/html/);
  assert.equal(index.body, INDEX);
  assert.equal(index.cache, "no-cache");
  assert.equal((await rawGet("/index.html")).body, INDEX);
  const script = await rawGet("/assets/index-abc123.js");
  assert.equal(script.status, 200);
  assert.match(script.type, /^text\/javascript/);
  assert.equal(script.body, SCRIPT);
  assert.match(script.cache, /immutable/);
  assert.equal((await rawGet("/assets/nested/deep.css")).status, 200);
  const icon = await rawGet("/favicon.svg");
  assert.equal(icon.status, 200);
  assert.match(icon.type, /^image\/svg\+xml/);
});

test("no directory listing, nothing outside the directory, no hidden files", async () => {
  const refused = [
    "/assets",
    "/assets/",
    "/assets/nested",
    "/assets/nested/",
    "/assets/../../outside.txt",
    "/assets/%2e%2e/%2e%2e/outside.txt",
    "/assets/..%2f..%2foutside.txt",
    "/%2e%2e%2foutside.txt",
    "/..%2Foutside.txt",
    "/assets/escape.txt",
    "/.env",
    "/assets/%00",
    "/assets/nope.js",
    "/assets/huge.js",
    "/assets/%ZZ",
    "/nope.html",
  ];
  for (const path of refused) {
    const answer = await rawGet(path);
    assert.ok(answer.status === 404 || answer.status === 400 || answer.status === 401, `${path} -> ${answer.status} ${answer.body.slice(0, 200)}`);
    assert.ok(!answer.body.includes("outside the console dir") && !answer.body.includes("SECRET"), `${path} leaks a file`);
    assert.ok(!answer.body.includes("index-abc123.js"), `${path} lists a directory`);
  }
});

test("every /api/v1 path and /metrics still need the token", async () => {
  for (const path of ["/api/v1/units", "/api/v1/health", "/api/v1/nothing", "/api/v1/openapi.json", "/metrics", "/api/v1/events"]) {
    const answer = await rawGet(path);
    assert.equal(answer.status, 401, `${path} -> ${answer.status}`);
  }
  assert.equal((await station.api("GET", "/api/v1/health")).status, 200);
});

test("without a built console, / says how to build it", async () => {
  const bare = await startStation({ extraArgs: ["--console-dir", join(tmp.path, "no-such-dir")] });
  try {
    const response = await fetch(`${bare.url}/`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/html/);
    assert.match(await response.text(), /the console is not built: run npm run build:console/i);
    assert.equal((await fetch(`${bare.url}/assets/index.js`)).status, 404);
  } finally {
    await bare.close();
  }
});
