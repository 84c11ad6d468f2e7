// Proves HOST:PORT parsing used by every --listen/--control/--station flag:
// IPv4, bracketed IPv6 and names are accepted, port 0 (pick a free port) is
// allowed, and malformed values name the flag.
import { test } from "node:test";
import assert from "node:assert/strict";
import { parseFlags, parseHostPort } from "./flags.ts";
import { UsageError } from "./errors.ts";

test("parseHostPort accepts the documented forms", () => {
  assert.deepEqual(parseHostPort("127.0.0.1:0", "--listen"), { host: "127.0.0.1", port: 0 });
  assert.deepEqual(parseHostPort("[::1]:10809", "--listen"), { host: "::1", port: 10809 });
  assert.deepEqual(parseHostPort("unit1.san.example:10809", "--listen"), { host: "unit1.san.example", port: 10809 });
});

test("parseHostPort refuses malformed addresses naming the flag", () => {
  for (const bad of ["127.0.0.1", ":80", "host:65536", "::1:80", "host:-1", "host:80x"]) {
    assert.throws(
      () => parseHostPort(bad, "--listen"),
      (e: unknown) => e instanceof UsageError && e.message.startsWith("--listen") && e.message.includes(bad),
    );
  }
});

test("parseFlags turns unknown flags into a UsageError", () => {
  assert.throws(() => parseFlags(["--nope"], { data: { type: "string" } }), UsageError);
  const { values } = parseFlags(["--data", "/x"], { data: { type: "string" } });
  assert.equal(values.data, "/x");
});
