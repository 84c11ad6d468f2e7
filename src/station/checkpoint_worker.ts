// Worker thread of the station: checkpoints the SQLite WAL into the database
// file on its own connection, so the fsyncs of a checkpoint never stall the
// station's event loop (better-sqlite3 is synchronous). PASSIVE checkpoints
// never block the station's writers. Messages: {stop: true} -> closes and exits.

import { parentPort, workerData } from "node:worker_threads";
import Database from "better-sqlite3";

interface Options {
  readonly path: string;
  readonly intervalMs: number;
  readonly busyTimeoutMs: number;
}

const options = workerData as Options;
const db = new Database(options.path, { timeout: options.busyTimeoutMs });
db.pragma("synchronous = FULL");
let stopping = false;

function checkpoint(): void {
  if (stopping) return;
  try {
    const [row] = db.pragma("wal_checkpoint(PASSIVE)") as { busy: number; log: number; checkpointed: number }[];
    parentPort?.postMessage({ kind: "checkpoint", ...row });
  } catch (error) {
    parentPort?.postMessage({ kind: "error", message: (error as Error).message });
  }
}

const timer = setInterval(checkpoint, options.intervalMs);
parentPort?.on("message", (message: { stop?: boolean }) => {
  if (message.stop !== true) return;
  stopping = true;
  clearInterval(timer);
  db.close();
  parentPort?.close();
});
