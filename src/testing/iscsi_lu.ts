// A tiny temporary logical unit for the iSCSI transport's own tests until the
// SCSI command set (src/scsi/, branch scsi) is merged: TEST UNIT READY,
// INQUIRY (standard, VPD 0x00/0x80/0x83), READ CAPACITY 10/16, READ/WRITE
// 10/16, SYNCHRONIZE CACHE 10, REPORT LUNS, MODE SENSE 6. Not shipped.

import type { BlockDevice } from "../block/types.ts";
import type { LogicalUnitLease } from "../iscsi/target.ts";
import { ScsiStatus, type LogicalUnit, type LogicalUnitIdentity, type ScsiRequest, type ScsiResponse } from "../scsi/types.ts";

function sense(key: number, asc: number, ascq = 0): ScsiResponse {
  const data = Buffer.alloc(18);
  data[0] = 0x70;
  data[2] = key;
  data[7] = 10;
  data[12] = asc;
  data[13] = ascq;
  return { status: ScsiStatus.CHECK_CONDITION, sense: data };
}

export function tinyLogicalUnit(device: BlockDevice, identity: LogicalUnitIdentity): LogicalUnitLease {
  const blocks = Math.floor(device.sizeBytes / 512);
  const rw = (cdb: Buffer): { lba: number; count: number } => {
    if (cdb[0] === 0x28 || cdb[0] === 0x2a || cdb[0] === 0x35) return { lba: cdb.readUInt32BE(2), count: cdb.readUInt16BE(7) };
    return { lba: Number(cdb.readBigUInt64BE(2)), count: cdb.readUInt32BE(10) };
  };
  const lu: LogicalUnit = {
    identity,
    device,
    maxTransferBytes: 8 * 1024 * 1024,
    dataOutLength(cdb) {
      if (cdb[0] === 0x2a || cdb[0] === 0x8a) return rw(cdb).count * 512;
      return 0;
    },
    nexusAdded() {},
    nexusRemoved() {},
    reset() {},
    async execute(request: ScsiRequest): Promise<ScsiResponse> {
      const cdb = request.cdb;
      switch (cdb[0]) {
        case 0x00:
          return { status: ScsiStatus.GOOD };
        case 0x12: {
          if ((cdb[1]! & 1) === 0) {
            const data = Buffer.alloc(36, 0x20);
            data[0] = 0;
            data[1] = 0;
            data[2] = 6;
            data[3] = 2;
            data[4] = 31;
            data[5] = 0;
            data[6] = 0;
            data[7] = 0x02;
            data.write("IPSAN   ", 8);
            data.write("tiny test lu    ", 16);
            data.write("0001", 32);
            return { status: ScsiStatus.GOOD, dataIn: data };
          }
          const page = cdb[2];
          if (page === 0x00) return { status: ScsiStatus.GOOD, dataIn: Buffer.from([0, 0, 0, 3, 0x00, 0x80, 0x83]) };
          if (page === 0x80) return { status: ScsiStatus.GOOD, dataIn: Buffer.concat([Buffer.from([0, 0x80, 0, identity.serial.length]), Buffer.from(identity.serial)]) };
          if (page === 0x83) {
            const naa = Buffer.from(identity.naa, "hex");
            return { status: ScsiStatus.GOOD, dataIn: Buffer.concat([Buffer.from([0, 0x83, 0, 4 + naa.length, 0x01, 0x03, 0, naa.length]), naa]) };
          }
          return sense(0x05, 0x24);
        }
        case 0x25: {
          const data = Buffer.alloc(8);
          data.writeUInt32BE(Math.min(blocks - 1, 0xffffffff), 0);
          data.writeUInt32BE(512, 4);
          return { status: ScsiStatus.GOOD, dataIn: data };
        }
        case 0x9e: {
          if ((cdb[1]! & 0x1f) !== 0x10) return sense(0x05, 0x24);
          const data = Buffer.alloc(32);
          data.writeBigUInt64BE(BigInt(blocks - 1), 0);
          data.writeUInt32BE(512, 8);
          return { status: ScsiStatus.GOOD, dataIn: data.subarray(0, Math.min(32, cdb.readUInt32BE(10))) };
        }
        case 0xa0: {
          const data = Buffer.alloc(16);
          data.writeUInt32BE(8, 0);
          return { status: ScsiStatus.GOOD, dataIn: data };
        }
        case 0x1a:
          return { status: ScsiStatus.GOOD, dataIn: Buffer.from([3, 0, 0, 0]) };
        case 0x35:
          await device.flush();
          return { status: ScsiStatus.GOOD };
        case 0x28:
        case 0x88: {
          const { lba, count } = rw(cdb);
          if (lba + count > blocks) return sense(0x05, 0x21);
          const data = Buffer.alloc(count * 512);
          await device.read(data, lba * 512);
          return { status: ScsiStatus.GOOD, dataIn: data };
        }
        case 0x2a:
        case 0x8a: {
          const { lba, count } = rw(cdb);
          if (lba + count > blocks) return sense(0x05, 0x21);
          const data = request.dataOut ?? Buffer.alloc(0);
          if (data.length < count * 512) return sense(0x05, 0x24);
          await device.write(data.subarray(0, count * 512), lba * 512, false);
          return { status: ScsiStatus.GOOD };
        }
        default:
          return sense(0x05, 0x20);
      }
    },
  };
  return { lu, release: () => undefined };
}
