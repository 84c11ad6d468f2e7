// The NBD pre-shared keys of hosts (issue 7, docs/security.md). A host
// proves who it is to a unit with TLS-PSK: identity = its host name, key =
// one 32-byte key per (host, unit) pair, so a unit only ever learns the keys
// that open itself. The station does not store the keys: each is derived
// from one secret of its own (STATION_DATA/host-keys.secret, 0600, created on
// first start) and the host's key epoch, which `ipsan hosts rotate-key`
// raises:
//
//   key(host, unit) = HMAC-SHA256(secret, "ipsan-nbd-psk-v1" 0 host 0 unit 0 epoch)
//
// The unit gets it with the grants (PUT /v1/volumes/V/grants), the host with
// GET /api/v1/hosts/NAME/keys (its own credential or an admin's).

import { createHmac } from "node:crypto";
import { promises as fs } from "node:fs";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { createSecretFileIfMissing } from "../util/secret_file.ts";

export const HOST_KEYS_SECRET_FILE_NAME = "host-keys.secret";
const SECRET_BYTES = 32;

declare const brand: unique symbol;
/** The station's secret that host keys are derived from. */
export type HostKeySecret = Buffer & { readonly [brand]: "HostKeySecret" };

/** Loads STATION_DATA/host-keys.secret, creating it (atomically, 0600) on first start. */
export async function loadOrCreateHostKeySecret(path: string): Promise<HostKeySecret> {
  await createSecretFileIfMissing(path, SECRET_BYTES);
  let text: string;
  try {
    text = await fs.readFile(path, "utf8");
  } catch (error) {
    throw new IpsanError("IO_ERROR", `host key secret ${path}: ${errorMessage(error)}`, { cause: error });
  }
  const trimmed = text.trim();
  if (!/^[0-9a-f]{64}$/i.test(trimmed)) throw new IpsanError("INVALID_ARGUMENT", `host key secret ${path}: expected ${SECRET_BYTES * 2} hex digits`);
  return Buffer.from(trimmed, "hex") as HostKeySecret;
}

/** A secret for tests and embedded stations that keep no files. */
export function hostKeySecretFrom(bytes: Buffer): HostKeySecret {
  if (bytes.length !== SECRET_BYTES) throw new IpsanError("INVALID_ARGUMENT", `host key secret: expected ${SECRET_BYTES} bytes`);
  return Buffer.from(bytes) as HostKeySecret;
}

/** The PSK (64 hex digits) that host `host` uses on unit `unit` at key epoch `epoch`. */
export function hostUnitKey(secret: HostKeySecret, host: string, unit: string, epoch: number): string {
  return createHmac("sha256", secret).update(`ipsan-nbd-psk-v1\0${host}\0${unit}\0${epoch}`).digest("hex");
}

/** One line of a key file in the format libnbd's tls-psk-file, nbdkit's --tls-psk and psktool use. */
export function pskFileLine(identity: string, keyHex: string): string {
  return `${identity}:${keyHex}\n`;
}
