// The cluster key: 32 random bytes, kept as 64 hex digits in a 0600 file
// (STATION_DATA/cluster.key, created by the station on first start; units get
// a copy through --cluster-key-file). Everything else is derived from it with
// HMAC-SHA256 and a label, so one secret never serves two purposes:
//   packet key    = HMAC(clusterKey, "ipsan-discovery-packet-v1")  (discovery HMAC tags)
//   control token = hex(HMAC(clusterKey, "ipsan-control-token:" + unitName))  (contracts.md;
//                   accepted by a unit only until it is enrolled)
//   enrol key     = HMAC(clusterKey, "ipsan-unit-enrol-v1")  (seals a unit's first secret)
// Each enrolled unit has its own 32-byte secret (issue 7, ADR 0004 amended):
//   unit packet key    = HMAC(secret, "ipsan-unit-packet-v1")
//   unit control token = hex(HMAC(secret, "ipsan-unit-control-token:" + unitName))
//   rotate key         = HMAC(secret, "ipsan-unit-rotate-v1")  (seals the next secret)

import { createCipheriv, createDecipheriv, createHmac, randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { createSecretFileIfMissing } from "../util/secret_file.ts";

declare const brand: unique symbol;
/** 32 bytes; obtained only through parseClusterKey/loadClusterKey/loadOrCreateClusterKey. */
export type ClusterKey = Buffer & { readonly [brand]: "ClusterKey" };

export const CLUSTER_KEY_BYTES = 32;
export const CLUSTER_KEY_FILE_NAME = "cluster.key";
/** A key file is 64 hex digits and a newline; anything much larger is not a key file. */
const KEY_FILE_BYTES_MAX = 1024;

const log = logger("discovery");

/** Parses the text of a key file; `source` names it in the error. */
export function parseClusterKey(text: string, source: string): ClusterKey {
  const trimmed = text.trim();
  if (!/^[0-9a-fA-F]{64}$/.test(trimmed)) {
    throw new IpsanError(
      "INVALID_ARGUMENT",
      `cluster key ${source}: expected ${CLUSTER_KEY_BYTES * 2} hex digits, got ${trimmed.length} characters`,
    );
  }
  return Buffer.from(trimmed, "hex") as ClusterKey;
}

export async function loadClusterKey(path: string): Promise<ClusterKey> {
  let handle: FileHandle;
  try {
    handle = await fs.open(path, "r");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new IpsanError(code === "ENOENT" ? "NOT_FOUND" : "IO_ERROR", `cluster key ${path}: ${errorMessage(error)}`, {
      cause: error,
    });
  }
  try {
    const stat = await handle.stat();
    if (stat.size > KEY_FILE_BYTES_MAX) {
      throw new IpsanError("INVALID_ARGUMENT", `cluster key ${path}: ${stat.size} bytes is not a key file`);
    }
    if ((stat.mode & 0o077) !== 0) {
      log.warn("cluster key file is readable by others; chmod 600 it", { path, mode: (stat.mode & 0o777).toString(8) });
    }
    const buffer = Buffer.alloc(KEY_FILE_BYTES_MAX);
    const { bytesRead } = await handle.read(buffer, 0, KEY_FILE_BYTES_MAX, 0);
    return parseClusterKey(buffer.toString("utf8", 0, bytesRead), path);
  } finally {
    await handle.close();
  }
}

/**
 * Loads the key at `path`, creating it (0600, 32 random bytes) if it does not
 * exist. Creation is atomic and exclusive: the key is written and fsynced to
 * a temporary file, then hard-linked into place, so a crash never leaves a
 * half-written key and two racing stations end up with the same one.
 */
export async function loadOrCreateClusterKey(path: string): Promise<ClusterKey> {
  try {
    return await loadClusterKey(path);
  } catch (error) {
    if (!(error instanceof IpsanError) || error.code !== "NOT_FOUND") throw error;
  }
  await createSecretFileIfMissing(path, CLUSTER_KEY_BYTES);
  return loadClusterKey(path);
}

/** The key that signs discovery datagrams. */
export function packetKeyFor(clusterKey: Buffer): Buffer {
  return createHmac("sha256", clusterKey).update("ipsan-discovery-packet-v1").digest();
}

/** The bearer token a unit accepts from the station on its control API (contracts.md). */
export function controlTokenFor(clusterKey: Buffer, unitName: string): string {
  return createHmac("sha256", clusterKey).update(`ipsan-control-token:${unitName}`).digest("hex");
}

/** A unit's own secret: 32 random bytes the station gives it at first join (issue 7). */
export const UNIT_SECRET_BYTES = 32;

/** The key that signs an enrolled unit's discovery datagrams (both ways). */
export function unitPacketKeyFor(secret: Buffer): Buffer {
  return createHmac("sha256", secret).update("ipsan-unit-packet-v1").digest();
}

/** The bearer token an enrolled unit accepts from the station on its control API. */
export function unitControlTokenFor(secret: Buffer, unitName: string): string {
  return createHmac("sha256", secret).update(`ipsan-unit-control-token:${unitName}`).digest("hex");
}

/** Seals a unit's first secret (ENROL under the cluster key). */
export function enrolKeyFor(clusterKey: Buffer): Buffer {
  return createHmac("sha256", clusterKey).update("ipsan-unit-enrol-v1").digest();
}

/** Seals a unit's next secret (ENROL of a rotation, under its current secret). */
export function rotateKeyFor(secret: Buffer): Buffer {
  return createHmac("sha256", secret).update("ipsan-unit-rotate-v1").digest();
}

/** What a sealed secret is bound to: the unit's name, identity and the secret's epoch. */
export interface SealBinding {
  readonly unitName: string;
  readonly unitId: string;
  readonly epoch: number;
}

function aadOf(binding: SealBinding): Buffer {
  return Buffer.from(`ipsan-unit-secret-v1\0${binding.unitName}\0${binding.unitId}\0${binding.epoch}`, "utf8");
}

/** AES-256-GCM with a random 96-bit nonce; the name, id and epoch are authenticated data. */
export function sealUnitSecret(wrapKey: Buffer, binding: SealBinding, secret: Buffer): { nonce: Buffer; sealed: Buffer; tag: Buffer } {
  const nonce = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", wrapKey, nonce);
  cipher.setAAD(aadOf(binding));
  const sealed = Buffer.concat([cipher.update(secret), cipher.final()]);
  return { nonce, sealed, tag: cipher.getAuthTag() };
}

/** The secret, or null if it was not sealed with this key for this binding. */
export function openUnitSecret(wrapKey: Buffer, binding: SealBinding, box: { nonce: Buffer; sealed: Buffer; tag: Buffer }): Buffer | null {
  try {
    const decipher = createDecipheriv("aes-256-gcm", wrapKey, box.nonce);
    decipher.setAAD(aadOf(binding));
    decipher.setAuthTag(box.tag);
    const secret = Buffer.concat([decipher.update(box.sealed), decipher.final()]);
    return secret.length === UNIT_SECRET_BYTES ? secret : null;
  } catch {
    return null;
  }
}
