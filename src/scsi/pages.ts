// INQUIRY data (standard and VPD pages) and mode pages: byte layouts from
// SPC-4 and SBC-3, documented byte by byte in docs/protocol/scsi.md.

import type { BlockCapabilities } from "../block/types.ts";
import type { LogicalUnitIdentity, ScsiNexus } from "./types.ts";
import {
  MAX_COMPARE_AND_WRITE_BLOCKS,
  MAX_TRANSFER_BLOCKS,
  MAX_UNMAP_DESCRIPTORS,
  MAX_UNMAP_LBA_COUNT,
  MAX_WRITE_SAME_BLOCKS,
  OPTIMAL_GRANULARITY_BLOCKS,
  OPTIMAL_TRANSFER_BLOCKS,
  UNMAP_GRANULARITY_BLOCKS,
} from "./limits.ts";

export const VENDOR = "IPSAN";
export const PRODUCT = "ipsan volume";
export const REVISION = "0001";

function ascii(text: string, length: number): Buffer {
  const out = Buffer.alloc(length, 0x20);
  out.write(text.replace(/[^\x20-\x7e]/g, "?").slice(0, length), "ascii");
  return out;
}

/** Thin provisioning as the logical unit reports it (READ CAPACITY 16 LBPME, VPD 0xB2). */
export function provisioning(capabilities: BlockCapabilities): { lbpme: boolean; lbprz: boolean; writeSameUnmap: boolean } {
  const lbpme = !capabilities.readOnly && (capabilities.canTrim || capabilities.canZero);
  // UNMAP and WRITE SAME with UNMAP go through BlockDevice.zero(mayTrim), which reads back zeroes.
  return { lbpme, lbprz: lbpme && capabilities.canZero, writeSameUnmap: lbpme };
}

/** Standard INQUIRY data (SPC-4 6.6.2): 96 bytes. */
export function standardInquiry(readOnly: boolean): Buffer {
  void readOnly;
  const out = Buffer.alloc(96);
  out[0] = 0x00; // peripheral qualifier 000b, device type 00h (direct access block device)
  out[1] = 0x00; // RMB=0: not removable
  out[2] = 0x06; // VERSION: SPC-4
  out[3] = 0x10 | 0x02; // HISUP=1, RESPONSE DATA FORMAT=2
  out[4] = 96 - 5; // ADDITIONAL LENGTH
  out[5] = 0x00; // SCCS=0, ACC=0, TPGS=00b (no ALUA), 3PC=0, PROTECT=0
  out[6] = 0x00; // ENCSERV=0, MULTIP=0
  out[7] = 0x02; // CMDQUE=1
  ascii(VENDOR, 8).copy(out, 8);
  ascii(PRODUCT, 16).copy(out, 16);
  ascii(REVISION, 4).copy(out, 32);
  // Version descriptors (bytes 58-73): SAM-5, iSCSI (RFC 7143), SPC-4, SBC-3.
  const versions = [0x00a0, 0x0960, 0x0460, 0x04c0];
  versions.forEach((v, i) => out.writeUInt16BE(v, 58 + 2 * i));
  return out;
}

/** VPD pages served, ascending (VPD 0x00). */
export const VPD_PAGES = [0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2] as const;

function vpdPage(code: number, body: Buffer): Buffer {
  const out = Buffer.alloc(4 + body.length);
  out[0] = 0x00;
  out[1] = code;
  out.writeUInt16BE(body.length, 2);
  body.copy(out, 4);
  return out;
}

function designator(codeSet: number, piv: boolean, association: number, type: number, value: Buffer): Buffer {
  const out = Buffer.alloc(4 + value.length);
  // PROTOCOL IDENTIFIER 5 (iSCSI) when PIV is set.
  out[0] = (piv ? 0x50 : 0x00) | codeSet;
  out[1] = (piv ? 0x80 : 0x00) | ((association & 3) << 4) | (type & 0x0f);
  out[3] = value.length;
  value.copy(out, 4);
  return out;
}

function nameString(text: string): Buffer {
  // SCSI name string: UTF-8, NUL-terminated, padded to a multiple of 4 (SPC-4 7.8.6.11).
  const raw = Buffer.from(`${text}\0`, "utf8");
  const out = Buffer.alloc(Math.ceil(raw.length / 4) * 4);
  raw.copy(out);
  return out;
}

export function vpd(code: number, identity: LogicalUnitIdentity, nexus: ScsiNexus, capabilities: BlockCapabilities): Buffer | undefined {
  switch (code) {
    case 0x00:
      return vpdPage(0x00, Buffer.from(VPD_PAGES));
    case 0x80:
      return vpdPage(0x80, Buffer.from(identity.serial.replace(/[^\x20-\x7e]/g, "?").slice(0, 32), "ascii"));
    case 0x83: {
      const parts = [
        // NAA designator of the logical unit: binary, association 00b, type 3.
        designator(0x1, false, 0, 0x3, Buffer.from(identity.naa.padEnd(16, "0").slice(0, 16), "hex")),
        // T10 vendor ID designator: ASCII, "IPSAN   " then the serial.
        designator(0x2, false, 0, 0x1, Buffer.concat([ascii(VENDOR, 8), Buffer.from(identity.serial, "ascii")])),
        // Relative target port designator: binary, association 01b (target port), type 4.
        designator(0x1, true, 1, 0x4, relativePort(nexus.relativeTargetPort)),
      ];
      if (nexus.targetName !== undefined) {
        // SCSI name strings (type 8, UTF-8) of the target port and the target device.
        parts.push(designator(0x3, true, 1, 0x8, nameString(`${nexus.targetName},t,0x${nexus.targetPortalGroupTag.toString(16).padStart(4, "0")}`)));
        parts.push(designator(0x3, true, 2, 0x8, nameString(nexus.targetName)));
      }
      return vpdPage(0x83, Buffer.concat(parts));
    }
    case 0x86: {
      // Extended INQUIRY Data (SPC-4 7.8.7): the task attributes the task set enforces (logical_unit.ts
      // TaskSet), HEADSUP|ORDSUP|SIMPSUP in byte 5; no protection, grouping, priority, ACA or microcode.
      const body = Buffer.alloc(0x3c);
      body[1] = 0x04 | 0x02 | 0x01;
      return vpdPage(0x86, body);
    }
    case 0xb0:
      return vpdPage(0xb0, blockLimits(capabilities));
    case 0xb1: {
      const body = Buffer.alloc(0x3c);
      body.writeUInt16BE(0x0001, 0); // MEDIUM ROTATION RATE: non-rotating medium
      return vpdPage(0xb1, body);
    }
    case 0xb2: {
      const p = provisioning(capabilities);
      const body = Buffer.alloc(4);
      body[0] = 0; // THRESHOLD EXPONENT
      // LBPU, LBPWS, LBPWS10, LBPRZ (bit 2), ANC_SUP=0, DP=0.
      body[1] = (p.lbpme ? 0x80 : 0) | (p.writeSameUnmap ? 0x40 | 0x20 : 0) | (p.lbprz ? 0x04 : 0);
      body[2] = p.lbpme ? 0x02 : 0x00; // PROVISIONING TYPE: thin (010b) or fully provisioned
      return vpdPage(0xb2, body);
    }
    default:
      return undefined;
  }
}

function relativePort(port: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt16BE(port & 0xffff, 2);
  return out;
}

/** VPD 0xB0 Block Limits body (SBC-3 6.5.3), 0x3C bytes. */
function blockLimits(capabilities: BlockCapabilities): Buffer {
  const body = Buffer.alloc(0x3c);
  const p = provisioning(capabilities);
  body[0] = 0x00; // WSNZ=0: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 covers through the last LBA
  body[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
  body.writeUInt16BE(OPTIMAL_GRANULARITY_BLOCKS, 2);
  body.writeUInt32BE(MAX_TRANSFER_BLOCKS, 4);
  body.writeUInt32BE(OPTIMAL_TRANSFER_BLOCKS, 8);
  body.writeUInt32BE(MAX_TRANSFER_BLOCKS, 12); // MAXIMUM PREFETCH LENGTH
  body.writeUInt32BE(p.lbpme ? MAX_UNMAP_LBA_COUNT : 0, 16);
  body.writeUInt32BE(p.lbpme ? MAX_UNMAP_DESCRIPTORS : 0, 20);
  body.writeUInt32BE(p.lbpme ? UNMAP_GRANULARITY_BLOCKS : 0, 24);
  body.writeUInt32BE(p.lbpme ? 0x80000000 : 0, 28); // UGAVALID=1, UNMAP GRANULARITY ALIGNMENT 0
  body.writeBigUInt64BE(BigInt(MAX_WRITE_SAME_BLOCKS), 32);
  return body;
}

// ---- Mode pages (SPC-4 7.5, SBC-3 6.4) ----

export const MODE_PAGES = [0x08, 0x0a, 0x1c] as const;

/** Page control: 0 current, 1 changeable, 2 default (3 saved is refused: no saved values). */
export type PageControl = 0 | 1 | 2;

/** One mode page as MODE SENSE returns it; nothing is changeable, so changeable pages are all zero after the header. */
export function modePage(code: number, pc: PageControl, capabilities: BlockCapabilities): Buffer | undefined {
  let page: Buffer;
  switch (code) {
    case 0x08: {
      page = Buffer.alloc(20);
      page[1] = 0x12;
      // WCE: writes may sit in the page cache until SYNCHRONIZE CACHE when the device can flush.
      page[2] = capabilities.canFlush ? 0x04 : 0x00;
      break;
    }
    case 0x0a: {
      page = Buffer.alloc(12);
      page[1] = 0x0a;
      page[2] = 0x00; // TST=000b, D_SENSE=0 (fixed-format sense), GLTSD=0
      page[3] = 0x10; // QUEUE ALGORITHM MODIFIER=1 (unrestricted reordering), QERR=00b
      page[4] = 0x00; // SWP=0
      page[5] = 0x00; // TAS=0
      page.writeUInt16BE(0xffff, 8); // BUSY TIMEOUT PERIOD: unlimited
      break;
    }
    case 0x1c: {
      page = Buffer.alloc(12);
      page[1] = 0x0a;
      page[2] = 0x08; // DEXCPT=1: informational exceptions disabled
      page[3] = 0x00; // MRIE=0
      break;
    }
    default:
      return undefined;
  }
  page[0] = code; // PS=0 (not savable), SPF=0
  if (pc === 1) page.fill(0, 2);
  return page;
}
