// Issue 9 item 10: a unit on a file system too small for its --capacity (the
// storage file is sparse) is warned about at start, and when that file system
// fills, a change is refused with 507 NO_SPACE saying what to do, not a 500
// "internal error: ENOSPC". A real unit on a real 16 MiB tmpfs.

import assert from "node:assert/strict";
import { mkdirSync, rmdirSync, writeFileSync } from "node:fs";
import { test } from "node:test";
import { controlRequest } from "../testing/control.ts";
import { run, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";

test("a --capacity larger than the file system: a warning at start; a full file system: 507 NO_SPACE with what to do", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("enospc");
  const mnt = dir.file("fs");
  mkdirSync(mnt);
  await runOk("mount", ["-t", "tmpfs", "-o", "size=16M", "tmpfs", mnt]);
  try {
    const unit = await startUnit({ capacity: "256M", control: true, dataDir: `${mnt}/data` });
    try {
      assert.match(unit.stderr(), /WARN unit: the storage file is larger than its file system can hold.* capacity=256M .*fileSystemFree=/);
      assert.equal((await controlRequest(unit, "POST", "/v1/volumes", { name: "v1", sizeBytes: 8 * 1024 * 1024 })).status, 201);
      // Fill the file system (dd stops at ENOSPC).
      await run("dd", ["if=/dev/zero", `of=${mnt}/filler`, "bs=1M", "count=64", "status=none"]);
      // Each change rewrites the volume table; once the table needs a block the file system no longer has,
      // the change is refused (never a 500). Volumes with long names make the table grow fast.
      let refused: { status: number; body: unknown } | undefined;
      for (let i = 2; i < 400 && refused === undefined; i++) {
        const answer = await controlRequest(unit, "POST", "/v1/volumes", { name: `volume-with-a-long-name-to-grow-the-table-${i}`, sizeBytes: 1024 * 1024 });
        assert.ok(answer.status === 201 || answer.status === 507, JSON.stringify(answer));
        if (answer.status === 507) refused = answer;
      }
      assert.ok(refused !== undefined, "the table never met the full file system");
      const error = (refused.body as { error: { code: string; message: string } }).error;
      assert.equal(error.code, "NO_SPACE");
      assert.match(error.message, /the file system under this unit's storage is full \(ENOSPC\): free space there, or start the unit with a --capacity/);
      assert.match(unit.stderr(), /WARN control: storage file system full: a change was refused/);
      // Space again: the same change works, and v1 is still there.
      writeFileSync(`${mnt}/filler`, "");
      const created = await controlRequest(unit, "POST", "/v1/volumes", { name: "v2", sizeBytes: 8 * 1024 * 1024 });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      assert.equal((await controlRequest(unit, "GET", "/v1/volumes/v1")).status, 200);
    } finally {
      await unit.close();
    }
  } finally {
    await run("umount", ["-l", mnt]);
    rmdirSync(mnt);
    dir.remove();
  }
});
