// SCSI sense data (SPC-4 4.5.3, fixed format 0x70) and the errors that carry
// it. Command handlers throw a SenseError; the logical unit turns it into a
// CHECK CONDITION response. Device failures (ENOSPC, EIO, a revoked export)
// map to sense here too, so execute() never rejects.

import { IpsanError } from "../util/errors.ts";

export const SenseKey = {
  NO_SENSE: 0x0,
  RECOVERED_ERROR: 0x1,
  NOT_READY: 0x2,
  MEDIUM_ERROR: 0x3,
  HARDWARE_ERROR: 0x4,
  ILLEGAL_REQUEST: 0x5,
  UNIT_ATTENTION: 0x6,
  DATA_PROTECT: 0x7,
  ABORTED_COMMAND: 0xb,
  MISCOMPARE: 0xe,
} as const;
export type SenseKeyCode = (typeof SenseKey)[keyof typeof SenseKey];

/** Additional sense code and qualifier, as [ASC, ASCQ]. */
export type Asc = readonly [number, number];

export const ASC = {
  NO_ADDITIONAL: [0x00, 0x00],
  NOT_READY_MANUAL_INTERVENTION: [0x04, 0x03],
  WRITE_ERROR: [0x0c, 0x00],
  INVALID_FIELD_IN_COMMAND_IU: [0x0e, 0x03],
  UNRECOVERED_READ_ERROR: [0x11, 0x00],
  PARAMETER_LIST_LENGTH_ERROR: [0x1a, 0x00],
  MISCOMPARE_DURING_VERIFY: [0x1d, 0x00],
  INVALID_COMMAND_OPERATION_CODE: [0x20, 0x00],
  LBA_OUT_OF_RANGE: [0x21, 0x00],
  INVALID_FIELD_IN_CDB: [0x24, 0x00],
  LOGICAL_UNIT_NOT_SUPPORTED: [0x25, 0x00],
  INVALID_FIELD_IN_PARAMETER_LIST: [0x26, 0x00],
  PARAMETER_NOT_SUPPORTED: [0x26, 0x01],
  INVALID_RELEASE_OF_PERSISTENT_RESERVATION: [0x26, 0x04],
  WRITE_PROTECTED: [0x27, 0x00],
  SPACE_ALLOCATION_FAILED_WRITE_PROTECT: [0x27, 0x07],
  POWER_ON_RESET: [0x29, 0x00],
  MODE_PARAMETERS_CHANGED: [0x2a, 0x01],
  RESERVATIONS_PREEMPTED: [0x2a, 0x03],
  RESERVATIONS_RELEASED: [0x2a, 0x04],
  REGISTRATIONS_PREEMPTED: [0x2a, 0x05],
  SAVING_PARAMETERS_NOT_SUPPORTED: [0x39, 0x00],
  INTERNAL_TARGET_FAILURE: [0x44, 0x00],
  INVALID_MESSAGE_ERROR: [0x49, 0x00],
  MEDIUM_REMOVAL_PREVENTED: [0x53, 0x02],
  INSUFFICIENT_REGISTRATION_RESOURCES: [0x55, 0x04],
} as const satisfies Record<string, Asc>;

/** Where in the CDB or parameter list the bad field is (sense-key specific bytes 15-17). */
export interface FieldPointer {
  /** True for the CDB (C/D = 1), false for the parameter list. */
  readonly inCdb: boolean;
  readonly byte: number;
  /** Bit (0-7) of the first bad bit, if known. */
  readonly bit?: number;
}

export interface SenseFields {
  readonly key: SenseKeyCode;
  readonly asc: Asc;
  /** INFORMATION (bytes 3-6, VALID set): e.g. the miscompare offset. */
  readonly information?: number;
  readonly field?: FieldPointer;
}

/** Fixed-format sense data, 18 bytes (SPC-4 table 50). */
export function fixedSense(fields: SenseFields): Buffer {
  const sense = Buffer.alloc(18);
  sense[0] = 0x70 | (fields.information === undefined ? 0 : 0x80);
  sense[2] = fields.key;
  if (fields.information !== undefined) sense.writeUInt32BE(fields.information >>> 0, 3);
  sense[7] = 10;
  sense[12] = fields.asc[0];
  sense[13] = fields.asc[1];
  if (fields.field !== undefined) {
    const bit = fields.field.bit;
    sense[15] = 0x80 | (fields.field.inCdb ? 0x40 : 0) | (bit === undefined ? 0 : 0x08 | (bit & 7));
    sense.writeUInt16BE(fields.field.byte & 0xffff, 16);
  }
  return sense;
}

/** A command's failure with its sense data; thrown by handlers, answered as CHECK CONDITION. */
export class SenseError extends Error {
  readonly fields: SenseFields;
  constructor(fields: SenseFields, message: string) {
    super(message);
    this.name = "SenseError";
    this.fields = fields;
  }
}

export function invalidFieldInCdb(byte: number, bit?: number, why = "invalid field in CDB"): SenseError {
  return new SenseError(
    { key: SenseKey.ILLEGAL_REQUEST, asc: ASC.INVALID_FIELD_IN_CDB, field: bit === undefined ? { inCdb: true, byte } : { inCdb: true, byte, bit } },
    `${why} (byte ${byte}${bit === undefined ? "" : ` bit ${bit}`})`,
  );
}

export function invalidFieldInParameterList(byte: number, bit?: number, why = "invalid field in parameter list"): SenseError {
  return new SenseError(
    {
      key: SenseKey.ILLEGAL_REQUEST,
      asc: ASC.INVALID_FIELD_IN_PARAMETER_LIST,
      field: bit === undefined ? { inCdb: false, byte } : { inCdb: false, byte, bit },
    },
    `${why} (parameter byte ${byte})`,
  );
}

export function illegalRequest(asc: Asc, why: string): SenseError {
  return new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc }, why);
}

export function lbaOutOfRange(why: string): SenseError {
  return illegalRequest(ASC.LBA_OUT_OF_RANGE, why);
}

export function parameterListLengthError(why: string): SenseError {
  return illegalRequest(ASC.PARAMETER_LIST_LENGTH_ERROR, why);
}

/**
 * Sense for a failed device call: ENOSPC is a thin-provisioning write
 * protect, EIO a medium error, a revoked export NOT READY; anything else is
 * an internal target failure. `writing` picks WRITE ERROR over UNRECOVERED READ ERROR.
 */
export function deviceErrorSense(error: unknown, writing: boolean): SenseFields {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  if (error instanceof IpsanError) {
    switch (error.code) {
      case "NO_SPACE":
        return { key: SenseKey.DATA_PROTECT, asc: ASC.SPACE_ALLOCATION_FAILED_WRITE_PROTECT };
      case "READ_ONLY":
        return { key: SenseKey.DATA_PROTECT, asc: ASC.WRITE_PROTECTED };
      case "OUT_OF_RANGE":
        // The logical unit checks every range before the device does: a range the device refuses is
        // a bug of the logical unit, reported (and logged) as one, not blamed on the initiator.
        return { key: SenseKey.HARDWARE_ERROR, asc: ASC.INTERNAL_TARGET_FAILURE };
      case "IO_ERROR":
      case "CORRUPT":
        return { key: SenseKey.MEDIUM_ERROR, asc: writing ? ASC.WRITE_ERROR : ASC.UNRECOVERED_READ_ERROR };
      case "NOT_SUPPORTED":
        return { key: SenseKey.ILLEGAL_REQUEST, asc: ASC.INVALID_FIELD_IN_CDB };
      default:
        // Revoked (volume deleted, grant lost), unit stopping, used after close.
        return { key: SenseKey.NOT_READY, asc: ASC.NOT_READY_MANUAL_INTERVENTION };
    }
  }
  if (code === "ENOSPC" || code === "EDQUOT") return { key: SenseKey.DATA_PROTECT, asc: ASC.SPACE_ALLOCATION_FAILED_WRITE_PROTECT };
  if (code === "EROFS") return { key: SenseKey.DATA_PROTECT, asc: ASC.WRITE_PROTECTED };
  if (code === "EIO") return { key: SenseKey.MEDIUM_ERROR, asc: writing ? ASC.WRITE_ERROR : ASC.UNRECOVERED_READ_ERROR };
  return { key: SenseKey.HARDWARE_ERROR, asc: ASC.INTERNAL_TARGET_FAILURE };
}
