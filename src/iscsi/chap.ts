// CHAP for iSCSI login (RFC 7143 section 12.1.3, RFC 1994): the target is
// the authenticator (CHAP_A, CHAP_I, CHAP_C out; CHAP_N, CHAP_R in) and, for
// mutual CHAP, answers the initiator's CHAP_I/CHAP_C with its own CHAP_N and
// CHAP_R. Algorithms: 5 (MD5, what libiscsi and most initiators offer) and
// 7 (SHA-256, RFC 7143bis / Linux open-iscsi 2.1.x), the initiator's first
// supported choice in its order.

import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

export const CHAP_ALGORITHMS: Readonly<Record<number, { hash: string; bytes: number }>> = {
  5: { hash: "md5", bytes: 16 },
  7: { hash: "sha256", bytes: 32 },
};

/** The first algorithm of the initiator's CHAP_A list we support, or undefined. */
export function chooseChapAlgorithm(list: string): number | undefined {
  for (const item of list.split(",")) {
    const number = /^[0-9]{1,3}$/.test(item) ? Number(item) : -1;
    if (CHAP_ALGORITHMS[number] !== undefined) return number;
  }
  return undefined;
}

/** CHAP response: H(identifier byte || secret || challenge). */
export function chapResponse(algorithm: number, identifier: number, secret: string, challenge: Buffer): Buffer {
  const spec = CHAP_ALGORITHMS[algorithm];
  if (spec === undefined) throw new Error(`unsupported CHAP algorithm ${algorithm}`);
  return createHash(spec.hash).update(Buffer.from([identifier & 0xff])).update(secret, "utf8").update(challenge).digest();
}

/** RFC 7143 section 6.1 binary values: 0x hex or 0b base64. undefined if malformed. */
export function parseBinary(value: string): Buffer | undefined {
  if (/^0[xX][0-9a-fA-F]+$/.test(value)) {
    const hex = value.slice(2);
    return Buffer.from(hex.length % 2 === 1 ? `0${hex}` : hex, "hex");
  }
  if (/^0[bB][A-Za-z0-9+/]+={0,2}$/.test(value)) return Buffer.from(value.slice(2), "base64");
  return undefined;
}

export function formatBinary(bytes: Buffer): string {
  return `0x${bytes.toString("hex")}`;
}

export function newChallenge(algorithm: number): { identifier: number; challenge: Buffer } {
  const spec = CHAP_ALGORITHMS[algorithm]!;
  const random = randomBytes(1 + spec.bytes);
  return { identifier: random[0]!, challenge: random.subarray(1) };
}

/** Constant-time comparison of an expected and a received response. */
export function responsesEqual(expected: Buffer, received: Buffer): boolean {
  return expected.length === received.length && timingSafeEqual(expected, received);
}
