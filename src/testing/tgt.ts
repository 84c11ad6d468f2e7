// tgt (Debian `tgt`, the Linux SCSI target framework's user-space iSCSI
// target) as a peer: started in the foreground on a loopback portal of a free
// port, with one file-backed LUN (LUN 1; tgt's LUN 0 is its controller), open
// to every initiator. For the iSCSI benchmark and the conformance anchor.

import { type Daemon, freeTcpPort, startDaemon } from "./daemon.ts";
import { run, runOk } from "./process.ts";

const PORT_ATTEMPTS_MAX = 5;
const TGTADM_TIMEOUT_MS = 10_000;

export interface RunningTgt {
  readonly portal: string;
  readonly iqn: string;
  readonly lun: number;
  /** iscsi://127.0.0.1:PORT/IQN/1, for libiscsi tools and qemu. */
  readonly uri: string;
  readonly pid: number;
  readonly settings: string;
  stop(): Promise<void>;
}

/** Starts tgtd serving `file` as LUN 1 of target `iqn` on 127.0.0.1. */
export async function startTgt(file: string, iqn: string): Promise<RunningTgt> {
  let lastError: unknown;
  for (let attempt = 0; attempt < PORT_ATTEMPTS_MAX; attempt++) {
    const port = await freeTcpPort();
    // tgtd's management socket is /var/run/tgtd/socket.N (N at most 32767): derived from the port,
    // so two tgtds rarely meet; one that does fails to start and the next attempt takes another port.
    const control = String(1000 + (port % 30_000));
    const tgtadm = (args: readonly string[]) => runOk("tgtadm", ["-C", control, "--lld", "iscsi", ...args], { timeoutMs: TGTADM_TIMEOUT_MS });
    const args = ["-f", "--iscsi", `portal=127.0.0.1:${port}`, "-C", control];
    let daemon: Daemon | undefined;
    try {
      daemon = await startDaemon("tgtd", args, {
        ready: async () => (await run("tgtadm", ["-C", control, "--op", "show", "--mode", "sys"], { timeoutMs: TGTADM_TIMEOUT_MS })).code === 0,
      });
      await tgtadm(["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn]);
      await tgtadm(["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", file]);
      await tgtadm(["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]);
      const running = daemon;
      return {
        portal: `127.0.0.1:${port}`,
        iqn,
        lun: 1,
        uri: `iscsi://127.0.0.1:${port}/${iqn}/1`,
        pid: running.pid,
        settings: `tgtd ${args.join(" ")}; LUN 1 = ${file} (backing store rdwr, tgt's defaults)`,
        stop: async () => {
          await running.stop();
        },
      };
    } catch (error) {
      lastError = error;
      await daemon?.stop();
    }
  }
  throw new Error(`cannot start tgtd: ${String(lastError)}`);
}
