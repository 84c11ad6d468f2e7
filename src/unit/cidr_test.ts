// Proves the access-control address matching: IPv4 and IPv6 CIDRs parse to a
// canonical form (single hosts without a prefix), IPv4-mapped IPv6 peers
// ("::ffff:127.0.0.1", as dual-stack sockets report them) match IPv4 CIDRs,
// host bits are masked, and malformed input is refused with a reason.

import { test } from "node:test";
import assert from "node:assert/strict";
import { cidrContains, loopbackCidrs, anyContains, parseCidr } from "./cidr.ts";

function cidr(text: string) {
  const parsed = parseCidr(text);
  assert.ok(parsed.ok, `${text} parses`);
  return parsed.cidr;
}

test("canonical forms", () => {
  assert.equal(cidr("10.1.0.5").text, "10.1.0.5");
  assert.equal(cidr("10.1.0.5/32").text, "10.1.0.5");
  assert.equal(cidr("10.1.2.3/16").text, "10.1.0.0/16");
  assert.equal(cidr("FD00:0:0:0:0:0:0:1/64").text, "fd00::/64");
  assert.equal(cidr("::1").text, "::1");
  assert.equal(cidr("::ffff:10.0.0.0/104").text, "10.0.0.0/8");
  assert.equal(cidr("0.0.0.0/0").text, "0.0.0.0/0");
  assert.equal(cidr("::/0").text, "::/0");
});

test("IPv4 CIDRs match IPv4 and IPv4-mapped IPv6 peers", () => {
  const net = cidr("127.0.0.0/8");
  assert.ok(cidrContains(net, "127.0.0.1"));
  assert.ok(cidrContains(net, "::ffff:127.0.0.1"));
  assert.ok(cidrContains(net, "::ffff:7f00:2"));
  assert.ok(!cidrContains(net, "128.0.0.1"));
  assert.ok(!cidrContains(net, "::1"));
  assert.ok(!cidrContains(net, "unix"));
  assert.ok(!cidrContains(cidr("10.1.0.5"), "10.1.0.6"));
});

test("IPv6 CIDRs", () => {
  const net = cidr("fd00:1::/32");
  assert.ok(cidrContains(net, "fd00:1:ffff::9"));
  assert.ok(!cidrContains(net, "fd00:2::1"));
  assert.ok(!cidrContains(net, "10.0.0.1"));
  assert.ok(anyContains(loopbackCidrs(), "::1"));
  assert.ok(anyContains(loopbackCidrs(), "127.9.9.9"));
  assert.ok(!anyContains(loopbackCidrs(), "10.0.0.1"));
});

test("malformed CIDRs are refused with a reason", () => {
  for (const bad of ["", "10.0.0.256", "10.0.0.0/33", "fd00::/129", "10.0.0.0/-1", "host.example", "1.2.3.4/8/8", "::1%eth0", "x".repeat(100), "10.0.0.0/ 8"]) {
    const parsed = parseCidr(bad);
    assert.equal(parsed.ok, false, `${JSON.stringify(bad)} must be refused`);
    if (!parsed.ok) assert.ok(parsed.reason.length > 0);
  }
});
