// Before `ipsan host attach` attaches, and before `ipsan host request` prints
// a command to use a volume, the host opens the export the way its client
// will (issue 9 item 7): a TCP connection from this machine (the kernel picks
// the source address, as for nbdfuse or nbd-client), STARTTLS with the host's
// key when the URI is nbds://, then NBD_OPT_GO. A unit that refuses names the
// peer it saw (NBD_REP_ERR_POLICY, src/unit/provider.ts); this turns that
// into what to do: "unit U refuses this host (peer A): the grant is for B".
// Only refusals are reported: an unreachable unit is left to the attach (a
// mirror's engine works with a leg down).

import { NbdClient } from "../nbd/client.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";

/** Connect, TLS and NBD_OPT_GO of one probe. */
export const PREFLIGHT_TIMEOUT_MS = 5_000;

export interface ExportToCheck {
  readonly uri: string;
  readonly unit: string;
  readonly export: string;
  /** The host the assignment is for, and the address the station has for it (what an address grant names). */
  readonly host: string;
  readonly hostAddress: string | null;
}

/** The peer the unit saw, from its refusal: "... to peer 127.0.0.1 (no TLS identity)" / "(identity h1)". */
export function refusedPeer(message: string): { address: string; identity: string | null } | null {
  const match = / to peer (\S+) \((?:no TLS identity|identity ([^)]+))\)/.exec(message);
  if (match === null) return null;
  return { address: match[1] ?? "", identity: match[2] ?? null };
}

/** What to tell the user when the unit refuses this host (exported for the test of its wording). */
export function explainRefusal(target: ExportToCheck, unitMessage: string): string {
  const peer = refusedPeer(unitMessage);
  const secure = target.uri.startsWith("nbds");
  const seen = peer === null ? "this host" : `this host (peer ${peer.address}${peer.identity === null ? "" : `, identity ${peer.identity}`})`;
  const head = `unit ${target.unit} refuses ${seen} for export ${target.export}`;
  if (secure) {
    return (
      `${head}: the grant is for host identity ${target.host}${peer?.identity !== null && peer?.identity !== undefined && peer.identity !== target.host ? `, not ${peer.identity}` : ""}. ` +
      `The unit may not have this host's current key yet (after ipsan hosts rotate-key, or while the station tells the unit): wait a few seconds and run it again; ` +
      `if it persists, see "ipsan assignments --host ${target.host}" and the unit's log (unit said: ${unitMessage})`
    );
  }
  const grant = target.hostAddress === null ? "another address" : target.hostAddress;
  const fix =
    peer === null
      ? `run it on host ${target.host}`
      : `run it on the machine at ${grant}, or, if this machine is host ${target.host}, record the address its NBD connections come from: ` +
        `ipsan hosts register ${target.host} --address ${peer.address} (or ipsan host request ... --address ${peer.address}); the station then grants that address`;
  return `${head}: the grant is for ${grant} (the address the station has for host ${target.host}). To proceed: ${fix}`;
}

/**
 * Opens the export as the host's client will and closes it. Null when the
 * unit admits this host (or cannot be reached: not a refusal); the refusal,
 * explained, otherwise.
 */
export async function checkExport(target: ExportToCheck, timeoutMs = PREFLIGHT_TIMEOUT_MS): Promise<IpsanError | null> {
  let client: NbdClient;
  try {
    client = await NbdClient.connect(target.uri, { connectTimeoutMs: timeoutMs });
  } catch (error) {
    if (error instanceof IpsanError && error.code === "PERMISSION_DENIED") {
      return new IpsanError("PERMISSION_DENIED", explainRefusal(target, errorMessage(error).replace(/^.*?export refused \(0x[0-9a-f]+\): /, "")), { cause: error });
    }
    return null;
  }
  await client.close().catch(() => undefined);
  return null;
}
