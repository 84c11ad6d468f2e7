// A real (virtual) network: the station, a unit and two hosts each run in
// their own network namespace, joined by veth pairs on a bridge, each with its
// own 10.231.X.Y address that exists only inside these namespaces. So the
// unit's join (UDP discovery to the station's address), the station's calls to
// the unit's control API, the hosts' API calls and their NBD traffic (NBD over
// TLS-PSK, the unit's default) all cross a network.
// Host 1 asks for a volume without --address: the station must register the
// address it sees (10.231.X.3); host 1 then reads and writes the volume with
// nbdinfo and nbdsh from its namespace, on the nbds:// URI and key file its
// request wrote to its state dir; host 2 is refused on it (plaintext, having
// no key yet), gets its own volume (and key), and is refused on host 1's
// volume with its own identity and key; host 1 is refused on host 2's volume
// the same way. The namespaces are deleted in a finally block and the test
// checks that none is left.

import { test } from "node:test";
import assert from "node:assert/strict";
import type { Assignment, UnitInfo } from "../host/station_client.ts";
import { describeResult, run, waitFor } from "../testing/process.ts";
import { San } from "./harness.ts";
import { PrivateNetwork, type NetNode } from "./netns.ts";

const MIB = 1024 * 1024;

function inNs(node: NetNode, command: string, args: readonly string[]) {
  return run("ip", [...node.exec.slice(1), command, ...args], { timeoutMs: 20_000 });
}

/** GET an API path from inside a namespace (the root namespace cannot reach these addresses). */
/** `uri` (nbds://) as another host would try it: its identity and key file, from `own` (that host's URI). */
function withIdentityOf(uri: string, own: string): string {
  const url = new URL(uri);
  const mine = new URL(own);
  url.username = mine.username;
  url.search = mine.search;
  return url.href;
}

async function apiGet(node: NetNode, apiUrl: string, tokenFile: string, path: string): Promise<unknown> {
  const script = `
    const token = require("fs").readFileSync(process.argv[2], "utf8").trim();
    fetch(process.argv[1], { headers: { authorization: "Bearer " + token }, signal: AbortSignal.timeout(5000) })
      .then(async (r) => { process.stdout.write(await r.text()); process.exit(r.ok ? 0 : 1); })
      .catch((e) => { process.stderr.write(String(e)); process.exit(2); });`;
  const result = await inNs(node, process.execPath, ["-e", script, new URL(path, apiUrl).href, tokenFile]);
  if (result.code !== 0) return undefined;
  return JSON.parse(result.stdout);
}

test("network namespaces: discovery, allocation and access control across a network", { timeout: 120_000 }, async (t) => {
  const support = await PrivateNetwork.supported();
  if (!support.ok) {
    t.skip(`kernel refuses network namespaces: ${support.why}`);
    return;
  }
  const net = await PrivateNetwork.create(["st", "u1", "h1", "h2"]);
  const san = new San("netns");
  try {
    const st = net.node("st");
    const u1 = net.node("u1");
    const h1 = net.node("h1");
    const h2 = net.node("h2");
    const station = await san.startStation({ http: `${st.address}:0`, discovery: `${st.address}:0`, prefix: st.exec });
    assert.ok(station.discovery.startsWith(`${st.address}:`), station.discovery);
    await san.startUnit("u1", { address: u1.address, prefix: u1.exec });

    const unit = await waitFor(
      "u1 online, seen from host 1's namespace",
      async () => {
        const body = (await apiGet(h1, station.apiUrl, station.tokenFile, "/api/v1/units")) as { items?: UnitInfo[] } | undefined;
        return body?.items?.find((u) => u.name === "u1" && u.state === "online");
      },
      { timeoutMs: 20_000, intervalMs: 200 },
    );
    assert.equal(unit.nbd?.host, u1.address, "the station knows the unit by its network address");

    const request = async (node: NetNode): Promise<Assignment> => {
      const { json } = await san.host(
        [
          "request", "--station", station.apiUrl, "--token-file", station.tokenFile, "--host", node.name, "--size", "32M",
          "--state-dir", san.tmp.file(`state-${node.name}`), "--json",
        ],
        node.exec,
      );
      return json as Assignment;
    };
    const a1 = await request(h1);
    assert.equal(a1.hostAddress, h1.address, "without --address the station registers the address it sees");
    assert.equal(new URL(a1.uri).hostname, u1.address);
    assert.match(a1.uri, /^nbds:\/\/h1@[^?]+\?tls-psk-file=/, "TLS-PSK with host 1's key file");

    const size = await inNs(h1, "nbdinfo", ["--size", a1.uri]);
    assert.equal(size.code, 0, describeResult(size));
    assert.equal(Number(size.stdout.trim()), 32 * MIB);
    // nbdsh reads a URI's tls-psk-file only when allowed (nbdinfo allows it itself).
    const io = await inNs(h1, "nbdsh", [
      "-c", "h.set_uri_allow_local_file(True)", "-c", `h.connect_uri(${JSON.stringify(a1.uri)})`, "-c",
      [
        "data = bytes(range(256)) * 4096",
        "h.pwrite(data, 4096)",
        "h.flush()",
        "assert h.pread(len(data), 4096) == data",
        "print('ok', len(data))",
      ].join("\n"),
    ]);
    assert.equal(io.code, 0, describeResult(io));
    assert.equal(io.stdout.trim(), "ok 1048576");

    const plain = new URL(a1.uri);
    const plainUri = `nbd://${plain.host}${plain.pathname}`;
    const refused = await inNs(h2, "nbdinfo", ["--size", plainUri]);
    assert.notEqual(refused.code, 0, `host 2 must be refused on host 1's volume (plaintext): ${describeResult(refused)}`);
    assert.match(refused.stderr, /TLS/, "the unit requires TLS");

    const a2 = await request(h2);
    assert.equal(a2.hostAddress, h2.address);
    assert.match(a2.uri, /^nbds:\/\/h2@[^?]+\?tls-psk-file=/, "TLS-PSK with host 2's key file");
    const own = await inNs(h2, "nbdinfo", ["--size", a2.uri]);
    assert.equal(own.code, 0, describeResult(own));
    const h2OnA1 = await inNs(h2, "nbdinfo", ["--size", withIdentityOf(a1.uri, a2.uri)]);
    assert.notEqual(h2OnA1.code, 0, `host 2 must be refused on host 1's volume with its own key: ${describeResult(h2OnA1)}`);
    // Past the TLS handshake (its key is good on this unit), refused on the export.
    assert.match(h2OnA1.stderr, /policy/, describeResult(h2OnA1));
    const cross = await inNs(h1, "nbdinfo", ["--size", withIdentityOf(a2.uri, a1.uri)]);
    assert.notEqual(cross.code, 0, `host 1 must be refused on host 2's volume: ${describeResult(cross)}`);
    assert.match(cross.stderr, /policy/, describeResult(cross));
  } finally {
    await san.close();
    await net.destroy();
    assert.deepEqual(await PrivateNetwork.leftovers(net.id), [], "every namespace removed");
  }
});
