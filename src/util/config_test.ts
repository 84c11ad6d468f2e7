import assert from "node:assert/strict";
import { createServer, type Server } from "node:net";
import { mkdirSync, writeFileSync } from "node:fs";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { UsageError } from "./errors.ts";
import { formatConfig, parseConfig } from "./config.ts";

test("config files: key = value, comments, relative paths from the file's directory; bad lines named with file:line", () => {
  const values = parseConfig("# a comment\n\nstation = http://10.0.0.1:8640\ntoken-file = keys/admin.token\nca-file=/etc/ipsan/ca.pem\n", "/etc/ipsan/ipsan.conf");
  assert.deepEqual(values, { station: "http://10.0.0.1:8640", "token-file": "/etc/ipsan/keys/admin.token", "ca-file": "/etc/ipsan/ca.pem" });
  assert.throws(() => parseConfig("station = x\ntokenfile = y\n", "/c"), (e: unknown) => e instanceof UsageError && /^\/c:2: unknown key "tokenfile" \(known: station, token-file/.test(e.message));
  assert.throws(() => parseConfig("just words\n", "/c"), /\/c:1: expected "key = value"/);
  assert.throws(() => parseConfig("host =\n", "/c"), /\/c:1: host has no value/);
  assert.deepEqual(parseConfig(formatConfig({ station: "http://a:1", host: "h1" }, "written by a test"), "/x/c"), { station: "http://a:1", host: "h1" });
});

/** A port where a TCP connection is accepted and closed (a station that is not one): every call there fails naming the URL. */
async function closedPort(): Promise<{ server: Server; url: string }> {
  const server = createServer((socket) => socket.destroy());
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  return { server, url: `http://127.0.0.1:${typeof address === "object" && address !== null ? address.port : 0}` };
}

test("precedence for admin and host commands: the flag, then the environment, then the config file (--config or ~/.config/ipsan/config)", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("config");
  const [fromFile, fromEnv, fromFlag] = [await closedPort(), await closedPort(), await closedPort()];
  try {
    writeFileSync(dir.file("token"), "t".repeat(32));
    const configText = formatConfig({ station: fromFile.url, "token-file": "token", host: "h1", "state-dir": "state" }, "test");
    writeFileSync(dir.file("ipsan.conf"), configText);
    const usedUrl = (stderr: string): string | undefined => /(http:\/\/127\.0\.0\.1:\d+)/.exec(stderr)?.[1];
    const ipsan = (args: string[], env: Record<string, string> = {}) => run(process.execPath, [IPSAN_BIN, ...args], { env: { XDG_CONFIG_HOME: dir.file("xdg"), ...env }, timeoutMs: 20_000 });

    // No setting anywhere: a usage error that says where a setting can come from.
    const none = await ipsan(["units"]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /--station URL is required \(or \$IPSAN_STATION, or "station = \.\.\." in /);

    for (const command of [["units"], ["host", "request", "--size", "1M"]]) {
      const file = await ipsan(["--config", dir.file("ipsan.conf"), ...command]);
      assert.equal(file.code, 1, file.stderr);
      assert.equal(usedUrl(file.stderr), fromFile.url, `${command.join(" ")}: ${file.stderr}`);
      const env = await ipsan(["--config", dir.file("ipsan.conf"), ...command], { IPSAN_STATION: fromEnv.url });
      assert.equal(usedUrl(env.stderr), fromEnv.url, `${command.join(" ")}: ${env.stderr}`);
      const flag = await ipsan(["--config", dir.file("ipsan.conf"), ...command, "--station", fromFlag.url], { IPSAN_STATION: fromEnv.url });
      assert.equal(usedUrl(flag.stderr), fromFlag.url, `${command.join(" ")}: ${flag.stderr}`);
    }
    // The user's config file is found without --config.
    mkdirSync(dir.file("xdg/ipsan"), { recursive: true });
    writeFileSync(dir.file("xdg/ipsan/config"), configText.replace("token-file = token", `token-file = ${dir.file("token")}`));
    const user = await ipsan(["units"]);
    assert.equal(usedUrl(user.stderr), fromFile.url, user.stderr);
    // A --config that is not there is an error, not a silent fallback.
    const missing = await ipsan(["--config", dir.file("nope.conf"), "units"]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--config: ".*nope\.conf" does not exist/);
  } finally {
    for (const s of [fromFile, fromEnv, fromFlag]) s.server.close();
    dir.remove();
  }
});
