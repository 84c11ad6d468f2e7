// What the station does with an SNMP trap (docs/protocol/snmp.md):
//   startup (coldStart/warmStart) or back (linkUp):
//     - a unit the discovery protocol knows (it has a session): ask it again
//       over UDP (NEED_STORAGE_INFO), so its storage info comes the usual way;
//     - otherwise (a unit or gateway that only sends traps): record it and
//       fetch GET /v1/info from the control API named in the trap
//       (ipsanUnitControl.0) with the token derived from the cluster key for
//       that unit name (controlTokenFor), and report it as unit_storage_info
//       with source "control_api";
//   shutdown (linkDown): mark the unit down.
// A trap that names no unit is matched to a known unit by its source address.
// Everything reaches the station core as ordinary DiscoveryListener events.

import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { controlTokenFor } from "./keys.ts";
import type { HostPort, StorageInfo } from "./messages.ts";
import type { SnmpEvent, SnmpTrapEvent, SnmpTrapListener } from "./snmp.ts";
import type { DiscoveryListener } from "./station_listener.ts";
import { validateStorageInfo } from "./storage_info.ts";
import { httpExchange } from "../util/http_client.ts";
import { retry, type BackoffPolicy } from "../util/retry.ts";

export const CONTROL_FETCH_TIMEOUT_MS = 5000;
export const CONTROL_FETCH_ATTEMPTS_MAX = 3;
/** The project's retry policy (src/util/retry.ts): 400 ms, then 800 ms, jittered. */
export const CONTROL_FETCH_BACKOFF: BackoffPolicy = { initialMs: 400, maxMs: 3_200, attemptsMax: CONTROL_FETCH_ATTEMPTS_MAX, jitterRatio: 0.2 };
export const CONTROL_RESPONSE_BYTES_MAX = 8 * 1024 * 1024;

export type FetchInfo = (unit: string, control: HostPort, token: string) => Promise<StorageInfo>;

function urlHost(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/** GET http://CONTROL/v1/info with the bearer token; bounded time and size; validated. */
export async function fetchInfoOverControl(unit: string, control: HostPort, token: string): Promise<StorageInfo> {
  const url = `http://${urlHost(control.host)}:${control.port}/v1/info`;
  const answer = await httpExchange({
    url,
    headers: { authorization: `Bearer ${token}`, accept: "application/json" },
    timeoutMs: CONTROL_FETCH_TIMEOUT_MS,
    maxBytes: CONTROL_RESPONSE_BYTES_MAX,
  });
  if (answer.status !== 200) throw new Error(`${url}: HTTP ${answer.status} ${answer.text().slice(0, 200)}`);
  const body = JSON.parse(answer.text()) as Record<string, unknown>;
  // GET /v1/info has no control or dnsName fields: we know the first, the second is not reported.
  const result = validateStorageInfo({ ...body, control, dnsName: null });
  if (result.kind === "invalid") throw new Error(`${url}: ${result.detail}`);
  if (result.value.name !== unit) throw new Error(`${url}: unit calls itself ${result.value.name}, the trap said ${unit}`);
  return result.value;
}

export interface SnmpJoinOptions {
  readonly snmp: SnmpTrapListener;
  readonly discovery: DiscoveryListener;
  readonly clusterKey: Buffer;
  /** Default: fetchInfoOverControl. */
  readonly fetchInfo?: FetchInfo;
}

/** Wires SNMP traps into the discovery listener; returns the unsubscribe function. */
export function attachSnmp(options: SnmpJoinOptions): () => void {
  const log = logger("snmp");
  const fetchInfo = options.fetchInfo ?? fetchInfoOverControl;
  const { discovery } = options;

  const nameOf = (event: SnmpTrapEvent): string | null => {
    if (event.agentName !== null) return event.agentName;
    const matches = discovery.units().filter((u) => u.address.host === event.from.host);
    return matches.length === 1 ? (matches[0]?.name ?? null) : null;
  };

  const fetchWithRetries = async (unit: string, control: HostPort, event: SnmpTrapEvent): Promise<void> => {
    const token = controlTokenFor(options.clusterKey, unit);
    try {
      const info = await retry(() => fetchInfo(unit, control, token), {
        policy: CONTROL_FETCH_BACKOFF,
        retryable: () => true,
        onRetry: (error, attempt) =>
          log.limited("snmp-fetch", "cannot fetch storage info over the control API; retrying", {
            unit,
            control: `${control.host}:${control.port}`,
            attempt,
            error: errorMessage(error),
          }),
      });
      discovery.ingestStorageInfo(unit, info, event.from);
    } catch (error) {
      log.limited("snmp-fetch-gave-up", "cannot fetch storage info over the control API; waiting for the next trap", {
        unit,
        control: `${control.host}:${control.port}`,
        attempts: CONTROL_FETCH_ATTEMPTS_MAX,
        error: errorMessage(error),
      });
    }
  };

  return options.snmp.subscribe((event: SnmpEvent) => {
    if (event.kind === "rejected" || event.kind === "ignored") return;
    const unit = nameOf(event);
    if (unit === null) {
      log.limited("snmp-unnamed", "trap names no unit and its address matches none", { from: event.from.host, kind: event.kind });
      return;
    }
    // An enrolled unit speaks only with its own secret (issue 7): a trap (community string, no key)
    // may at most make the station ask it over the authenticated UDP protocol; it never marks it
    // down, and the station never sends its control token to an address a trap names.
    const enrolled = discovery.isEnrolled(unit);
    if (event.kind === "shutdown") {
      if (enrolled) log.limited("snmp-enrolled", "linkDown for an enrolled unit ignored (traps do not speak for enrolled units)", { unit });
      else if (!discovery.markDown(unit, "snmp linkDown")) log.limited("snmp-unknown", "linkDown for an unknown unit", { unit });
      return;
    }
    const known = discovery.unit(unit);
    if (known !== undefined && known.mode === "discovery" && known.sessionId !== null && discovery.requestStorageInfo(unit)) return;
    if (enrolled) {
      log.limited("snmp-enrolled", "trap for an enrolled unit not followed (it joins over the discovery protocol with its own secret)", { unit });
      return;
    }
    if (event.control === null) {
      log.limited("snmp-no-control", "cannot fetch storage info: the trap names no control address (ipsanUnitControl.0)", { unit });
      return;
    }
    discovery.noteExternalStartup(unit, event.from, "snmp");
    void fetchWithRetries(unit, event.control, event);
  });
}
