// Proves the raw NBD probe that the sharing tests rely on, against nbdkit (a
// server nobody here wrote): it negotiates NBD_OPT_GO, writes and reads back
// bytes, reports an unknown export as a refusal (not a crash; nbdkit's
// exportname filter in strict mode refuses other names), and really connects
// FROM the source address it is given (the kernel's own socket address says
// 127.0.0.3). Without this the sharing test's "host B is refused" could be a
// probe that never binds. (nbdkit 1.32's ip filter cannot parse single IPv4
// addresses on this machine, so the binding is checked on the socket.)

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { startDaemon, tcpAccepts, freeTcpPort } from "../testing/daemon.ts";
import { openExport } from "./nbd_probe.ts";

test("raw NBD probe: GO, read/write, refusal, and source address binding", { timeout: 30_000 }, async () => {
  const port = await freeTcpPort();
  const server = await startDaemon(
    "nbdkit",
    ["--foreground", "-i", "127.0.0.1", "-p", String(port), "--filter=exportname", "memory", "4M", "exportname=disk", "exportname-strict=true"],
    { ready: tcpAccepts("127.0.0.1", port) },
  );
  try {
    const opened = await openExport({ host: "127.0.0.1", port, localAddress: "127.0.0.3", exportName: "disk" });
    assert.equal(opened.kind, "open", JSON.stringify(opened));
    if (opened.kind !== "open") return;
    assert.equal(opened.client.localAddress, "127.0.0.3");
    assert.equal(opened.sizeBytes, 4 * 1024 * 1024);
    const data = randomBytes(8192);
    await opened.client.write(4096, data);
    await opened.client.flush();
    assert.ok((await opened.client.read(4096, 8192)).equals(data));
    opened.client.close();

    const denied = await openExport({ host: "127.0.0.1", port, localAddress: "127.0.0.2", exportName: "other" });
    assert.equal(denied.kind, "refused", JSON.stringify(denied));
    assert.ok(denied.kind === "refused" && denied.error.startsWith("NBD_REP_ERR_"), JSON.stringify(denied));
  } finally {
    await server.stop();
  }
});
