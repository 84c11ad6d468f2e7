// iSCSI assignments (issue 10): the refusals shared by allocation and the
// manual assign, and what a unit must have to be given one. The mirror
// engine speaks NBD to its legs, so a mirror is never served over iSCSI.

import { IpsanError } from "../../util/errors.ts";
import type { HostRecord, Protocol, UnitRecord } from "../types.ts";

/** protocol iscsi with copies > 1: refused (400 on `protocol`). */
export function refuseIscsiMirror(protocol: Protocol, copies: number): void {
  if (protocol !== "iscsi" || copies <= 1) return;
  throw new IpsanError(
    "INVALID_ARGUMENT",
    `protocol iscsi serves a single copy only: a mirror (copies ${copies}) is served by the host's mirror engine, which speaks NBD to its legs. ` +
      "Ask for copies 1 with protocol iscsi, or for the mirror with protocol nbd",
    { field: "protocol" },
  );
}

/** protocol iscsi for a host without an initiator name: refused (409 on `host`), saying how to register one. */
export function refuseHostWithoutIqn(protocol: Protocol, hostName: string, host: HostRecord | undefined): void {
  if (protocol !== "iscsi" || (host?.iqn ?? null) !== null) return;
  const what = host === undefined ? `host ${hostName} is not registered, so it has no iSCSI initiator name` : `host ${hostName} has no iSCSI initiator name (IQN) registered`;
  throw new IpsanError(
    "CONFLICT",
    `${what}: the unit admits an iSCSI login only from the host's own initiator. Register it (ipsan hosts register ${hostName} --address IP --iqn IQN, ` +
      `or ipsan host agent --iqn IQN on the host; on Linux the IQN is in /etc/iscsi/initiatorname.iscsi) and ask again, or use protocol nbd`,
    { field: "host" },
  );
}

/** Why unit `unit` cannot serve an iSCSI assignment (undefined: it can). */
export function iscsiUnitProblem(unit: UnitRecord): string | undefined {
  if (unit.iscsi === undefined || unit.iscsi === null) return "serves no iSCSI (its /v1/info reports no portal: start it with --iscsi HOST:PORT)";
  return undefined;
}

/** protocol iscsi on a unit that serves no iSCSI: refused (409 on `unit`). */
export function refuseUnitWithoutIscsi(protocol: Protocol, unit: UnitRecord): void {
  if (protocol !== "iscsi") return;
  const problem = iscsiUnitProblem(unit);
  if (problem === undefined) return;
  throw new IpsanError("CONFLICT", `unit ${unit.name} ${problem}; or assign a volume of a unit that serves iSCSI, or use protocol nbd`, { field: "unit" });
}
