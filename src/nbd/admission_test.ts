// What this proves: a peer that matches neither --allow nor any volume's
// grant is refused at connect time, before the NBD greeting (a stranger never
// learns it reached an NBD server), is logged with its address, and allowed
// peers and granted hosts keep being served. Source addresses are chosen with
// localAddress on loopback (127.0.0.2 / 127.0.0.3), which the unit sees as
// the peer address.

import assert from "node:assert/strict";
import net from "node:net";
import { after, before, test } from "node:test";
import { waitFor } from "../testing/process.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";

let unit: RunningUnit;

before(async () => {
  unit = await startUnit({ capacity: "64M", volumes: [{ name: "a", size: "8M" }], allow: ["127.0.0.1/32"] });
});

after(async () => {
  await unit?.close();
});

/** Connects from `localAddress` and returns the first bytes the server sends, or "" if it closes first. */
function firstBytes(localAddress: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: unit.host, port: unit.port, localAddress });
    let received = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer from the unit within 5 s (from ${localAddress})`));
    }, 5000);
    socket.on("data", (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length >= 8) socket.end();
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(received.subarray(0, 8).toString("latin1"));
    });
  });
}

test("a peer outside --allow with no grant gets no greeting", async () => {
  assert.equal(await firstBytes("127.0.0.2"), "", "refused before the greeting");
  await waitFor("refusal logged", () => (/not allowed.*127\.0\.0\.2/.test(unit.stderr()) ? true : undefined), {
    timeoutMs: 5000,
  });
  assert.equal(await firstBytes("127.0.0.1"), "NBDMAGIC", "an allowed peer still gets the greeting");
});
