// ipsan station rotate-cluster-key --data DIR: replaces STATION_DATA/cluster.key
// with 32 new random bytes (atomically: written 0600 and fsynced beside it,
// renamed over it, directory fsynced). The cluster key only enrols units
// (issue 7): enrolled units speak with their own secrets and keep working;
// units not enrolled yet need the new key file. The station reads the key at
// start: restart it (or run this while it is stopped).

import { randomBytes } from "node:crypto";
import { join, resolve } from "node:path";
import { CLUSTER_KEY_BYTES, CLUSTER_KEY_FILE_NAME, loadClusterKey } from "../discovery/keys.ts";
import { UsageError } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { writeSecretFileAtomic } from "../util/secret_file.ts";

const USAGE = "usage: ipsan station rotate-cluster-key --data DIR";

export async function rotateClusterKeyMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { data: { type: "string" }, help: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"\n${USAGE}`);
  if (values.data === undefined || values.data === "") throw new UsageError(`--data DIR is required\n${USAGE}`);
  const path = join(resolve(values.data), CLUSTER_KEY_FILE_NAME);
  // The old key must exist: this rotates a station's key, it does not create a station.
  await loadClusterKey(path).catch((error: unknown) => {
    throw new UsageError(`--data: ${(error as Error).message}`);
  });
  await writeSecretFileAtomic(path, `${randomBytes(CLUSTER_KEY_BYTES).toString("hex")}\n`);
  process.stdout.write(
    `new cluster key written to ${path}; restart the station to use it. Enrolled units keep working (they use their own secrets); ` +
      `copy the new file to units that have not enrolled yet (--cluster-key-file)\n`,
  );
  return 0;
}
