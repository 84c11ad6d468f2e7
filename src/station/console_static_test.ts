// The console's static files (src/station/console_static.ts) from a real
// directory: index.html at / with the security headers, an asset by its one
// path segment (immutable), and 404 for everything that is not one plain
// asset name (traversal, dot files, nested paths, encoded slashes); a missing
// build answers / with a page saying how to build it.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { consoleFile, isConsolePath } from "./console_static.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";

test("index, assets, refusals, and the page of a missing build", async () => {
  const tmp = makeTempDir("console-static", memoryTmpBase());
  try {
    mkdirSync(tmp.file("assets"));
    writeFileSync(tmp.file("index.html"), "<!doctype html><title>ipsan console</title>");
    writeFileSync(tmp.file("assets/index-abc.js"), "console.log(1)");
    writeFileSync(tmp.file("secret.txt"), "no");
    const index = await consoleFile(tmp.path, "/");
    assert.equal(index.status, 200);
    assert.equal(index.headers["content-type"], "text/html; charset=utf-8");
    assert.equal(index.headers["cache-control"], "no-cache");
    assert.match(index.headers["content-security-policy"] ?? "", /default-src 'self'/);
    assert.equal(index.headers["x-frame-options"], "DENY");
    assert.equal(index.headers["x-content-type-options"], "nosniff");
    const js = await consoleFile(tmp.path, "/assets/index-abc.js");
    assert.equal(js.status, 200);
    assert.equal(js.body.toString(), "console.log(1)");
    assert.match(js.headers["content-type"] ?? "", /^text\/javascript/);
    assert.match(js.headers["cache-control"] ?? "", /immutable/);
    for (const path of ["/assets/../secret.txt", "/assets/..", "/assets/.env", "/assets/%2e%2e%2fsecret.txt", "/assets/a/b.js", "/assets/", "/assets/missing.js", "/secret.txt"]) {
      assert.equal((await consoleFile(tmp.path, path)).status, 404, path);
    }
    const missing = await consoleFile(tmp.file("not-built"), "/");
    assert.equal(missing.status, 200);
    assert.match(missing.body.toString(), /npm run build:console/);
    assert.equal(isConsolePath("GET", "/"), true);
    assert.equal(isConsolePath("HEAD", "/assets/x.js"), true);
    assert.equal(isConsolePath("POST", "/"), false);
    assert.equal(isConsolePath("GET", "/api/v1/units"), false);
  } finally {
    tmp.remove();
  }
});
