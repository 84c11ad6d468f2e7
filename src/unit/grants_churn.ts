// Grant churn for the kill -9 test of identity grants (grants_crash_test.ts):
// a child process opens a unit (VolumeManager: volume table + DATA/host-keys.psk)
// with three volumes and replaces their identity grants as fast as it can:
// random hosts h0..h5, random exports, and now and then a new key for a host
// (a rotation, which rewrites that host's grants on every volume). It prints
// "acked N" after change N is answered.
//
//   node dist/unit/grants_churn.js DATA_DIR SEED

import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { setLogLevel } from "../util/log.ts";
import { seededRandom } from "../util/random.ts";
import { MIB } from "./layout.ts";
import type { IdentityGrantInput } from "./volume_ops.ts";
import { VolumeManager } from "./volumes.ts";

export const GRANTS_CHURN_CAPACITY_BYTES = 32 * MIB;
export const GRANTS_CHURN_VOLUMES = ["g0", "g1", "g2"] as const;

function keyFor(host: string, generation: number): Buffer {
  return createHash("sha256").update(`${host}/${generation}`).digest();
}

async function main(dataDir: string, seed: number): Promise<void> {
  setLogLevel("error");
  const manager = await VolumeManager.open({ dataDir, capacityBytes: GRANTS_CHURN_CAPACITY_BYTES });
  for (const name of GRANTS_CHURN_VOLUMES) {
    await manager.ensure(name, 2 * MIB);
    if (manager.volume(name)?.partitions.length === 0) await manager.setPartitions(name, [MIB / 2, MIB / 2]);
  }
  const random = seededRandom(seed);
  const generations = new Map<string, number>();
  process.stdout.write("ready\n");
  for (let step = 0; ; step++) {
    const volume = GRANTS_CHURN_VOLUMES[Math.floor(random() * GRANTS_CHURN_VOLUMES.length)] ?? "g0";
    const grants: IdentityGrantInput[] = [];
    const hosts = new Set<string>();
    const count = Math.floor(random() * 4);
    for (let i = 0; i < count; i++) {
      const host = `h${Math.floor(random() * 6)}`;
      if (hosts.has(host)) continue;
      hosts.add(host);
      // A rotation now and then: the host's next key.
      if (random() < 0.2) generations.set(host, (generations.get(host) ?? 0) + 1 + (seed % 7));
      const partition = random() < 0.5 ? undefined : 1 + Math.floor(random() * 2);
      grants.push({ host, key: keyFor(host, generations.get(host) ?? seed % 7), partition, from: [] });
    }
    await manager.setIdentityGrants(volume, grants);
    process.stdout.write(`acked ${step}\n`);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main(process.argv[2] ?? "", Number(process.argv[3] ?? "1")).catch((error: unknown) => {
    process.stderr.write(`grants churn: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    process.exit(1);
  });
}
