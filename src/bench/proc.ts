// CPU time of a server process, for the benchmarks' "CPU per request"
// figures: utime+stime do not depend on what else the machine runs, where
// wall-clock throughput on a shared machine does.

import { readFileSync } from "node:fs";
import { runOk } from "../testing/process.ts";

/** utime+stime of a process and all its threads in seconds (from /proc/PID/stat); 0 once it has gone. */
export function cpuSeconds(pid: number, ticksPerSecond: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond;
  } catch {
    return 0;
  }
}

/** Clock ticks per second (getconf CLK_TCK; 100 when it prints nothing usable). */
export async function clockTicksPerSecond(): Promise<number> {
  return Number((await runOk("getconf", ["CLK_TCK"])).stdout.trim()) || 100;
}

/**
 * Writes back the dirty pages of the file system that holds `path` (`sync -f`).
 * Called after every write job, before the next server's run: else that run
 * may pay for this one's writeback (the kernel's flusher threads on the same
 * two CPUs, ext4's journal), and the rotation does not share that out evenly:
 * the iSCSI bench put ipsan's iSCSI frontend right after tgt's seqwrite1m in
 * three rounds of five and its NBD frontend in none (there: 3230, 2465 and 2109
 * MiB/s after tgt, 2917 and 3448 otherwise; docs/benchmarks.md, 2026-12-04 09:27).
 */
export async function syncFileSystem(path: string): Promise<void> {
  await runOk("sync", ["-f", path]);
}
