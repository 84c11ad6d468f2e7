// fio's nbd engine over TLS-PSK. fio 3.33 calls nbd_connect_uri without
// nbd_set_uri_allow_local_file, so libnbd refuses the ?tls-psk-file= of an
// nbds:// URI. allow_local_file.c (built here with gcc into a work dir) is an
// LD_PRELOAD that makes that one call first; fio run with the environment
// this returns speaks TLS-PSK to the server directly. Used by the benchmark
// (src/bench/nbd_bench.ts) and the real-client tests (src/realclients/tls_test.ts).

import { join } from "node:path";
import { runOk } from "./process.ts";
import { REPO_ROOT } from "./unit.ts";

/** Builds the preload into `dir`; returns the environment to run fio with. */
export async function fioTlsEnv(dir: string): Promise<Record<string, string>> {
  const shim = join(dir, "allow_local_file.so");
  await runOk("gcc", ["-shared", "-fPIC", "-O2", "-o", shim, join(REPO_ROOT, "src", "testing", "allow_local_file.c"), "-ldl"]);
  return { LD_PRELOAD: shim };
}
