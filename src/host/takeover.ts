// Host failover, the spare's side (docs/adr/0010-host-failover-and-fencing.md):
// the agent of a host attaches the assignments the station moved to it after
// another host went silent (host = this host, movedFrom set, the move
// finished: the old host is fenced on every unit and this host is granted)
// that it has no record of yet, with --takeover-mode; from then on they are
// attachments like any other (the agent keeps them attached). The old host's
// agent, when it runs again, no longer finds them under its name at the
// station and detaches them. An iSCSI assignment is the host's initiator's to
// log in to: the agent writes this host's CHAP secret for the unit and records
// it (mode iscsi, as `ipsan host attach` does), nothing is started.

import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { attach, attachIscsi } from "./attach.ts";
import type { AttachMode, HostState } from "./state.ts";
import type { Assignment, StationAssignment, StationClient } from "./station_client.ts";

const log = logger("host-agent");

export type TakeoverMode = Extract<AttachMode, "nbd" | "fuse">;

/** True for an assignment a finished host failover moved to `host`. */
export function movedHere(assignment: Assignment, host: string): boolean {
  return assignment.host === host && assignment.state === "active" && (assignment.movedFrom ?? null) !== null && (assignment.movedAt ?? null) !== null;
}

/**
 * Attaches every assignment moved to `host` that has no record in `state`; failures are logged and retried at the next check.
 * `assignments` is the station's list for this host, fetched once per agent check (undefined: the station is away, and
 * nothing new can have been moved here meanwhile).
 */
export async function takeOverMoved(options: {
  readonly client: StationClient;
  readonly state: HostState;
  readonly host: string;
  readonly mode: TakeoverMode;
  readonly assignments: readonly Assignment[] | undefined;
  readonly stopping: () => boolean;
}): Promise<void> {
  const { client, state, host, mode } = options;
  const moved = (options.assignments ?? []).filter((a) => movedHere(a, host));
  for (const assignment of moved) {
    if (options.stopping()) return;
    try {
      if ((await state.get(String(assignment.id))) !== undefined) continue;
      const request = { assignment: assignment as StationAssignment, station: client.baseUrl.href, host };
      // iSCSI: the CHAP secret written and the attachment recorded; the initiator (the user's) logs in.
      const record = assignment.protocol === "iscsi" ? await attachIscsi(state, client, request) : await attach(state, { ...request, mode });
      log.info("took over an assignment moved from a failed host", { assignment: record.assignmentId, from: assignment.movedFrom ?? "", mode: record.mode, path: record.path });
    } catch (error) {
      log.limited(`takeover:${assignment.id}`, "cannot attach an assignment moved to this host (will retry)", { assignment: assignment.id, error: errorMessage(error) });
    }
  }
}
