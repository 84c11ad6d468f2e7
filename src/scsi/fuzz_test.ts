// Fuzzing the logical unit with fast-check: random CDBs (every supported
// opcode with random fields, and random bytes), random Data-Out and
// ExpectedDataTransferLength, several nexuses. execute() never rejects,
// always answers a valid status (with 18 bytes of fixed-format sense on
// CHECK CONDITION, never HARDWARE ERROR), dataOutLength() never throws and
// stays bounded, and no command touches a byte outside its volume: the neighbouring volumes on the
// same storage file keep their bytes.

import { test } from "node:test";
import { setLogLevel } from "../util/log.ts";
import { fuzzExecute } from "./scenarios.ts";

setLogLevel("error");

test("fuzz: execute never rejects, answers valid status and sense, and never touches another volume's bytes", { timeout: 300_000 }, async () => {
  await fuzzExecute(3000);
});
