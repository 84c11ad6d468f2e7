// Kill -9 in the middle of a churn (the crash tests of the unit's volume
// table and of its identity grants): a child process (a compiled churn
// script taking DATA_DIR SEED) prints "ready", then "acked N" after each
// change it made durable; it is SIGKILLed `delayMs` after "ready". Resolves
// with the last acknowledged step (-1 if none).

import { spawn } from "node:child_process";

export const CHURN_READY_TIMEOUT_MS = 10_000;

export function churnAndKill(script: string, dataDir: string, seed: number, delayMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, dataDir, String(seed)], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    let killTimer: NodeJS.Timeout | undefined;
    const readyTimer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`churn child ${script} not ready within ${CHURN_READY_TIMEOUT_MS} ms: ${err}`));
    }, CHURN_READY_TIMEOUT_MS);
    child.stdout.setEncoding("utf8");
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk: string) => (err += chunk));
    child.stdout.on("data", (chunk: string) => {
      out += chunk;
      if (killTimer === undefined && out.includes("ready\n")) {
        clearTimeout(readyTimer);
        killTimer = setTimeout(() => child.kill("SIGKILL"), delayMs);
      }
    });
    child.on("exit", (code, signal) => {
      clearTimeout(readyTimer);
      clearTimeout(killTimer);
      if (signal !== "SIGKILL") return reject(new Error(`churn child ${script} exited code=${code} signal=${signal}: ${err}`));
      const acked = [...out.matchAll(/^acked (\d+)$/gm)].map((m) => Number(m[1]));
      resolve(acked.length === 0 ? -1 : Math.max(...acked));
    });
  });
}
