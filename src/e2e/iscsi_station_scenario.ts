// The initiator check of an iSCSI grant, as a real initiator sees it (shared by
// iscsi_station_test.ts and its canary): with the host's CHAP user and secret,
// libiscsi's iscsi-inq logs in as the granted initiator name and reads the
// target's INQUIRY; logging in as any other initiator name, with the same
// user and secret, is refused.

import assert from "node:assert/strict";
import { describeResult, run } from "../testing/process.ts";

const COMMAND_TIMEOUT_MS = 30_000;

export interface IscsiLogin {
  readonly portal: string;
  readonly target: string;
  readonly chapUser: string;
  readonly secret: string;
  /** The IQN the unit's grant names. */
  readonly granted: string;
  /** Another initiator name (the host's old one, or a stranger's). */
  readonly other: string;
}

/** Throws (naming which) unless the granted initiator gets in and the other does not. */
export async function onlyTheGrantedInitiator(login: IscsiLogin): Promise<void> {
  const inq = (iqn: string) =>
    run("iscsi-inq", ["-i", iqn, `iscsi://${login.chapUser}@${login.portal}/${login.target}/0`], {
      timeoutMs: COMMAND_TIMEOUT_MS,
      env: { LIBISCSI_CHAP_PASSWORD: login.secret },
    });
  const granted = await inq(login.granted);
  assert.equal(granted.code, 0, `the granted initiator ${login.granted} must log in: ${describeResult(granted)}`);
  const other = await inq(login.other);
  assert.notEqual(other.code, 0, `another initiator (${login.other}) logged in with the host's CHAP secret: ${describeResult(other)}`);
}
