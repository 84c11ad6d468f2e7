// kill -9 while identity grants change (issue 7): a child (grants_churn.ts)
// replaces grants, with key rotations, on a real unit's table and key file
// as fast as it can; we SIGKILL it at a random moment, 12 rounds on the same
// data dir. After every kill the unit opens (the table loads, the key file
// parses: never half-written) and every identity grant in the table has its
// host's key in DATA/host-keys.psk (the key is written before the table that
// grants it). A grant whose key was rotated by a change cut short admits no
// one (keyId differs) until the next grants call: never a grant that opens
// with a key nobody granted. Seeds are printed.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { statSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { pskKeyId } from "../nbd/tls.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { HOST_KEYS_FILE_NAME } from "./host_keys.ts";
import { VolumeManager } from "./volumes.ts";
import { churnAndKill } from "../testing/churn_kill.ts";

setLogLevel("error");
const ROUNDS = 12;
const CHILD = fileURLToPath(new URL("./grants_churn.js", import.meta.url));

/** The keys written after the table (with a 5 ms window): what the order in VolumeManager#change prevents. */
const KEYS_AFTER_TABLE = {
  file: "dist/unit/volumes.js",
  from: "                if (keys !== undefined)\n                    await this.hostKeys.replace(new Map([...this.hostKeys.entries(), ...keys]));\n                await this.#store.write(change.table);",
  to: "                await this.#store.write(change.table);\n                await new Promise((r) => setTimeout(r, 5));\n                if (keys !== undefined)\n                    await this.hostKeys.replace(new Map([...this.hostKeys.entries(), ...keys]));",
};


async function crashRounds(child: string): Promise<void> {
  const dir = makeTempDir("grants-crash", memoryTmpBase());
  try {
    let acked = 0;
    let grantsSeen = 0;
    let stale = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const seed = randomInt(1, 2 ** 31);
      const delayMs = randomInt(30, 250);
      acked += (await churnAndKill(child, dir.path, seed, delayMs)) + 1;
      const manager = await VolumeManager.open({ dataDir: dir.path });
      try {
        for (const volume of manager.table.volumes) {
          for (const grant of volume.access) {
            grantsSeen += 1;
            const key = manager.hostKeys.get(grant.host);
            assert.ok(key !== undefined, `round ${round} seed ${seed}: volume ${volume.name} grants ${grant.host} but ${HOST_KEYS_FILE_NAME} has no key for it`);
            if (pskKeyId(key) !== grant.keyId) stale += 1;
          }
        }
        if (manager.hostKeys.size > 0) assert.equal(statSync(dir.file(HOST_KEYS_FILE_NAME)).mode & 0o777, 0o600);
      } finally {
        await manager.close();
      }
    }
    assert.ok(acked > ROUNDS * 5, `only ${acked} grant changes acknowledged over ${ROUNDS} rounds`);
    assert.ok(grantsSeen > 0, "the table held identity grants after some kill");
    process.stderr.write(`grants crash test: ${acked} changes acknowledged; ${grantsSeen} grants checked after kills, ${stale} with a rotated key cut short (admit no one)\n`);
  } finally {
    dir.remove();
  }
}

test("kill -9 during identity grant changes: the unit opens, and every grant in the table has its host's key on disk", async () => {
  await crashRounds(CHILD);
});

test("canary: with the keys written after the table, a kill leaves a grant without its key, and the check fails", async () => {
  const build = patchedBuild("canary-keys-after-table", [KEYS_AFTER_TABLE]);
  try {
    await assert.rejects(crashRounds(`${build.root}/dist/unit/grants_churn.js`), /has no key for it/);
  } finally {
    build.remove();
  }
});
