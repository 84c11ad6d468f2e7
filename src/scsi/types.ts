// The seam between the iSCSI transport (src/iscsi/) and the SCSI block
// command set (src/scsi/): the transport moves PDUs, gathers Data-Out and
// splits Data-In; the logical unit decodes CDBs and runs them on a
// BlockDevice (src/block/types.ts). Neither side knows the other's insides,
// so another transport (a future SRP or vhost) could reuse the command set.

import type { BlockDevice } from "../block/types.ts";

/** SAM-5 status codes the logical unit answers with. */
export const ScsiStatus = {
  GOOD: 0x00,
  CHECK_CONDITION: 0x02,
  CONDITION_MET: 0x04,
  BUSY: 0x08,
  RESERVATION_CONFLICT: 0x18,
  TASK_SET_FULL: 0x28,
  ACA_ACTIVE: 0x30,
  TASK_ABORTED: 0x40,
} as const;
export type ScsiStatusCode = (typeof ScsiStatus)[keyof typeof ScsiStatus];

/**
 * The I_T nexus a command came through (SAM-5): persistent reservations,
 * unit attentions and RESERVE(6) are kept per nexus. For iSCSI the initiator
 * port is "InitiatorName,i,0xISID" and the target port "TargetName,t,0xTPGT"
 * (RFC 7143 section 4.2.7, SPC-4 TransportID format 0x05 with FORMAT CODE 01b).
 */
export interface ScsiNexus {
  /** iSCSI InitiatorName as logged in (the TransportID's name). */
  readonly initiatorName: string;
  /** The session's ISID: 12 lowercase hex digits. */
  readonly isid: string;
  /** Target portal group tag of the session (ipsan uses 1). */
  readonly targetPortalGroupTag: number;
  /** Relative target port identifier (VPD 0x83, PR IN READ FULL STATUS): 1. */
  readonly relativeTargetPort: number;
  /**
   * The iSCSI TargetName the session logged in to (added by the scsi branch):
   * when given, VPD 0x83 also carries SCSI name string designators of the
   * target port ("NAME,t,0xTPGT") and the target device ("NAME").
   */
  readonly targetName?: string;
}

export type TaskAttribute = "simple" | "ordered" | "head-of-queue" | "aca";

export interface ScsiRequest {
  /** The CDB: 16 bytes from the BHS, longer if an extended-CDB AHS came too. */
  readonly cdb: Buffer;
  readonly nexus: ScsiNexus;
  readonly attribute: TaskAttribute;
  /** The initiator's ExpectedDataTransferLength. */
  readonly expectedLength: number;
  /**
   * The Data-Out the transport gathered: min(expectedLength, dataOutLength(cdb))
   * bytes for a command with W set, undefined for one without.
   */
  readonly dataOut: Buffer | undefined;
  /**
   * Optional: where a READ's Data-In goes (a buffer of exactly `bytes`, e.g.
   * from the transport's pool, given back once the reply is sent). Only READ
   * uses it; without it the unit allocates.
   */
  readonly allocateDataIn?: ((bytes: number) => Buffer) | undefined;
  /**
   * Optional, for a READ answered at once (LogicalUnit.executeNow): once
   * every check has passed, the transport may send `lengthBytes` of the
   * device at `offsetBytes` as the command's whole Data-In with GOOD status,
   * straight from the page cache (sendfile). True when it did (the unit then
   * answers `dataInSent` and the transport sends nothing more), false when it
   * sent nothing (the unit reads the data as usual). Never throws.
   */
  readonly sendDataIn?: ((offsetBytes: number, lengthBytes: number) => boolean) | undefined;
}

export interface ScsiResponse {
  readonly status: ScsiStatusCode;
  /** Sense data (fixed format, 0x70) with CHECK CONDITION; the transport prefixes its 2-byte length. */
  readonly sense?: Buffer;
  /** Data-In: the transport sends at most expectedLength bytes of it and sets the residual counts. */
  readonly dataIn?: Buffer;
  /** GOOD, and the transport's sendDataIn already sent the Data-In and the status: nothing more to send. */
  readonly dataInSent?: true;
}

/** What the SCSI layer needs to know about the device besides its bytes. */
export interface LogicalUnitIdentity {
  /**
   * VPD 0x83 NAA designator (16 hex digits, NAA 3 "locally assigned" or NAA 6):
   * stable for the life of the volume or partition, the same across unit
   * restarts, and reported by the unit's control API so the station shows it.
   */
  readonly naa: string;
  /** VPD 0x80 unit serial number: printable ASCII, at most 32 characters. */
  readonly serial: string;
  /** The export name ("VOLUME" or "VOLUME/pN"), for logs and designators. */
  readonly exportName: string;
}

/**
 * One logical unit (LUN 0 of a target) over an opened BlockDevice. Shared by
 * every session that opened the same export on this unit (reservations and
 * unit attentions span sessions): the transport gets it from a registry
 * keyed by export name and releases it when its session ends.
 */
export interface LogicalUnit {
  readonly identity: LogicalUnitIdentity;
  readonly device: BlockDevice;
  /**
   * Bytes of Data-Out this CDB transfers (0 for a command without any), so
   * the transport can size R2Ts and compute the residual against
   * ExpectedDataTransferLength. An undecodable CDB gives 0 (execute answers it).
   */
  dataOutLength(cdb: Buffer): number;
  /** Largest single transfer the unit accepts (VPD 0xB0 MAXIMUM TRANSFER LENGTH, in bytes). */
  readonly maxTransferBytes: number;
  /** Runs one command. Never rejects: every failure is a status with sense data. */
  execute(request: ScsiRequest): Promise<ScsiResponse>;
  /**
   * Optional: execute(), answered with a plain response (no promise, no
   * microtask) when the command needs no waiting (a READ from the page
   * cache, a WRITE into it); a promise otherwise. Never throws or rejects.
   */
  executeNow?(request: ScsiRequest): ScsiResponse | Promise<ScsiResponse>;
  /**
   * Optional: the transport aborted this command (ABORT TASK, a task set
   * cleared, a reset, its session ended) after handing it to execute() or
   * executeNow(). One still waiting for its turn in the task set (behind an
   * ORDERED command) never runs and stops holding back the commands after
   * it; its promise answers TASK ABORTED. One already running completes.
   */
  abort?(request: ScsiRequest): void;
  /** A new I_T nexus logged in: it gets a POWER ON/RESET unit attention once. */
  nexusAdded(nexus: ScsiNexus): void;
  /** The nexus's session ended: RESERVE(6) held by it is released; PR registrations stay (SPC-4 5.13). */
  nexusRemoved(nexus: ScsiNexus): void;
  /** LOGICAL UNIT RESET / TARGET WARM RESET task management: clears RESERVE(6), sets unit attentions. */
  reset(from: ScsiNexus): void;
}
