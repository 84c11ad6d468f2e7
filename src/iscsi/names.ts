// iSCSI names and CHAP secrets shared by the unit (which serves targets),
// the station (which tells hosts where to log in) and the host (which logs in).

import { createHmac } from "node:crypto";

/** Every ipsan target name starts with this (RFC 7143 "iqn." format, naming authority org.ipsan, 2026-12). */
export const IQN_PREFIX = "iqn.2026-12.org.ipsan:";

/** RFC 3720/7143 names are at most 223 bytes. */
export const ISCSI_NAME_BYTES_MAX = 223;

/**
 * The IQN form of one name part: lowercased, and "_" (outside the IQN
 * alphabet a-z 0-9 "-" "." ":") mapped to "-". Unit, volume and host names
 * use [A-Za-z0-9_.-] only, so nothing else needs mapping. Two names can map
 * to the same part ("Data" and "data", "a_b" and "a-b"): the unit serves a
 * target name for the oldest export that maps to it only (src/iscsi/ logs the other).
 */
export function iqnPart(name: string): string {
  return name.toLowerCase().replaceAll("_", "-");
}

/**
 * The target name of an export on a unit: `iqn.2026-12.org.ipsan:UNIT.VOLUME`
 * for a volume, `...:UNIT.VOLUME.pN` for its partition N ("VOLUME/pN").
 */
export function iscsiTargetName(unit: string, exportName: string): string {
  const slash = exportName.indexOf("/");
  const volume = slash < 0 ? exportName : exportName.slice(0, slash);
  const partition = slash < 0 ? "" : `.${exportName.slice(slash + 1)}`;
  return `${IQN_PREFIX}${iqnPart(unit)}.${iqnPart(volume)}${partition}`;
}

/** Characters of a CHAP secret; 16 of them (Windows' initiator takes 12 to 16). */
export const CHAP_SECRET_LENGTH = 16;

/**
 * The CHAP secrets a host and a unit derive from the host's key for that unit
 * (the same key as NBD's TLS-PSK, delivered the same way): "initiator" is the
 * secret the host answers the unit's challenge with (the CHAP user name is the
 * host name); "target" is the unit's answer to the host's challenge (mutual
 * CHAP). They differ, as RFC 7143 section 12.1.3 requires. Base64url of 96 bits.
 */
export function chapSecret(key: Buffer, role: "initiator" | "target"): string {
  return createHmac("sha256", key).update(`ipsan iscsi chap v1 ${role}`).digest("base64url").slice(0, CHAP_SECRET_LENGTH);
}

/**
 * The iSCSI names ipsan accepts for an initiator (a host's IQN, a grant's
 * `iqn`), in the lowercase ASCII form RFC 3722's stringprep profile yields:
 * - "iqn." YYYY-MM "." reversed domain, then optionally ":" and a unique
 *   string of a-z 0-9 "-" "." ":" (RFC 3720 3.2.6.3.1);
 * - "eui." and 16 hex digits (3.2.6.3.2);
 * - "naa." and 16 or 32 hex digits (RFC 3980).
 * At most ISCSI_NAME_BYTES_MAX bytes.
 */
export const ISCSI_NAME_PATTERN =
  /^(?:iqn\.[0-9]{4}-(?:0[1-9]|1[0-2])\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[a-z0-9.:-]*)?|eui\.[0-9a-f]{16}|naa\.(?:[0-9a-f]{16}|[0-9a-f]{32}))$/;

/**
 * Why `value` is not an iSCSI name ipsan accepts (undefined: it is one). The
 * reason says what is wrong and what a name looks like; it quotes at most
 * the first 64 characters of the value.
 */
export function iscsiNameProblem(value: unknown): string | undefined {
  if (typeof value !== "string") return `expected an iSCSI name (a string such as "iqn.1994-05.com.redhat:client1"), got ${value === null ? "null" : typeof value}`;
  const shown = JSON.stringify(value.length > 64 ? `${value.slice(0, 64)}...` : value);
  if (Buffer.byteLength(value, "utf8") > ISCSI_NAME_BYTES_MAX) return `${shown} is ${Buffer.byteLength(value, "utf8")} bytes, more than ISCSI_NAME_BYTES_MAX=${ISCSI_NAME_BYTES_MAX}`;
  if (value !== value.toLowerCase()) return `${shown} has capital letters: iSCSI names are compared in lowercase, give ${JSON.stringify(value.toLowerCase().slice(0, 64))}`;
  if (!ISCSI_NAME_PATTERN.test(value)) {
    return `${shown} is not an iSCSI name: expected "iqn.YYYY-MM.reversed.domain[:unique]" (e.g. "iqn.1994-05.com.redhat:client1"), "eui." and 16 hex digits, or "naa." and 16 or 32 hex digits (RFC 3720, RFC 3980)`;
  }
  return undefined;
}
