// Secrets kept in files (the station's admin token and cluster key, a unit's
// control token): created once, on first start, and never half-written.

import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, dirname, join } from "node:path";

export const SECRET_BYTES_DEFAULT = 32;

/**
 * Creates `path` holding `bytes` random bytes as hex and a newline, mode
 * 0600, unless it already exists. The secret is written and fsynced to a
 * temporary file, then hard-linked into place: a crash never leaves a
 * half-written secret, and two processes racing to create it end up with the
 * same one (the loser's link fails with EEXIST and it reads the winner's).
 */
export async function createSecretFileIfMissing(path: string, bytes: number = SECRET_BYTES_DEFAULT): Promise<void> {
  const temporary = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
  const handle = await fs.open(temporary, "wx", 0o600);
  try {
    await handle.writeFile(`${randomBytes(bytes).toString("hex")}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await fs.link(temporary, path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
  } finally {
    await fs.unlink(temporary);
  }
  // The new name must survive a crash too.
  await fsyncPath(dirname(path));
}

/**
 * Replaces `path` with `text` atomically: written (0600) and fsynced to a
 * temporary file in the same directory, renamed over `path`, then the
 * directory fsynced. A crash leaves the old file or the new one, never a mix.
 */
export async function writeSecretFileAtomic(path: string, text: string): Promise<void> {
  const temporary = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
  const handle = await fs.open(temporary, "wx", 0o600);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await fs.rename(temporary, path);
  } catch (error) {
    await fs.unlink(temporary).catch(() => undefined);
    throw error;
  }
  await fsyncPath(dirname(path));
}

/** fsync(2) of a file or directory by path (a directory: the names in it survive a crash). */
export async function fsyncPath(path: string): Promise<void> {
  const handle = await fs.open(path, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
