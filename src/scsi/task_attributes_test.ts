// Task attributes (SAM-5 8.6) in the logical unit's one task set
// (TST=000b: shared by every session): ORDERED waits for everything before
// it and holds back everything after it, HEAD OF QUEUE starts at once,
// SIMPLE waits only behind an ORDERED command, ACA is refused. Commands are
// held inside a real device (a gate over a volume's storage file) so the
// order in which they start and finish shows.

import { test } from "node:test";
import assert from "node:assert/strict";
import { setLogLevel } from "../util/log.ts";
import { abortedOrderedReleasesWaiters, orderedReadAfterWrite } from "./scenarios.ts";
import { ALICE, BOB, CAROL, cdb10, hex, request, run, senseOf, settle, watch, withGatedSessions } from "./testing.ts";
import { ScsiStatus } from "./types.ts";

setLogLevel("error");

const block = (fill: number): Buffer => Buffer.alloc(512, fill);

test("ORDERED READ through another session waits for a held SIMPLE WRITE and reads its data", async () => {
  await orderedReadAfterWrite();
});

test("a command after an ORDERED one waits until the ORDERED one completed; the counters drain to zero", async () => {
  await withGatedSessions(1, {}, async (gate, [lu], core) => {
    assert.ok(lu !== undefined);
    gate.shut();
    const first = watch(lu.execute(request(ALICE, cdb10(0x2a, 1, 1), block(1))));
    await settle();
    const ordered = watch(lu.execute(request(ALICE, cdb10(0x2a, 2, 1), block(2), { attribute: "ordered" })));
    // A SIMPLE command of any kind, even one that needs no device (TEST UNIT READY), waits behind it.
    const after = watch(lu.execute(request(ALICE, [0x00, 0, 0, 0, 0, 0])));
    const write = watch(lu.execute(request(ALICE, cdb10(0x2a, 3, 1), block(3))));
    await settle();
    assert.equal(gate.arrived, 1, "neither the ORDERED WRITE nor the SIMPLE one after it reached the device");
    assert.equal(after.settled, false);
    assert.equal(core.tasks.waitingCount, 3);
    gate.open();
    await settle();
    // The gate is open now: the ORDERED WRITE ran alone, then the rest.
    for (const w of [first, ordered, after, write]) assert.equal((await w.promise).status, ScsiStatus.GOOD);
    assert.equal(gate.arrived, 3);
    assert.equal(hex((await run(lu, ALICE, cdb10(0x28, 1, 3))).dataIn), hex(Buffer.concat([block(1), block(2), block(3)])));
    assert.deepEqual([core.tasks.running, core.tasks.ordered, core.tasks.waitingCount], [0, 0, 0]);
  });
});

test("the commands after an ORDERED one start only once it completed, not merely started", async () => {
  await withGatedSessions(1, {}, async (gate, [lu]) => {
    assert.ok(lu !== undefined);
    gate.shut();
    const ordered = watch(lu.execute(request(ALICE, cdb10(0x2a, 4, 1), block(4), { attribute: "ordered" })));
    await settle();
    assert.equal(gate.held, 1, "an ORDERED command with nothing before it starts at once");
    const read = watch(lu.execute(request(ALICE, cdb10(0x28, 4, 1), undefined, { expectedLength: 512 })));
    await settle();
    assert.equal(read.settled, false, "a SIMPLE READ overtook a running ORDERED WRITE");
    gate.open();
    assert.equal((await ordered.promise).status, ScsiStatus.GOOD);
    assert.equal(hex((await read.promise).dataIn), hex(block(4)));
  });
});

test("HEAD OF QUEUE starts at once while an ORDERED command waits, and a later ORDERED one waits for it", async () => {
  await withGatedSessions(2, { reads: true }, async (gate, [a, b], core) => {
    assert.ok(a !== undefined && b !== undefined);
    gate.shut();
    const held = watch(a.execute(request(ALICE, cdb10(0x28, 0, 1), undefined, { expectedLength: 512 })));
    const ordered = watch(a.execute(request(ALICE, [0x00, 0, 0, 0, 0, 0], undefined, { attribute: "ordered" })));
    const simple = watch(b.execute(request(BOB, [0x00, 0, 0, 0, 0, 0])));
    const head = watch(b.execute(request(BOB, [0x12, 0, 0, 0, 36, 0], undefined, { attribute: "head-of-queue" })));
    await settle();
    assert.equal(head.settled, true, "HEAD OF QUEUE INQUIRY was not answered at once");
    assert.equal((await head.promise).status, ScsiStatus.GOOD);
    assert.equal(ordered.settled, false);
    assert.equal(simple.settled, false, "a SIMPLE command after a waiting ORDERED one ran");
    // A HEAD OF QUEUE READ held in the device runs beside the first one (not behind the ORDERED command)...
    const headRead = watch(b.execute(request(BOB, cdb10(0x28, 1, 1), undefined, { attribute: "head-of-queue", expectedLength: 512 })));
    await settle();
    assert.equal(gate.held, 2, "HEAD OF QUEUE READ did not reach the device while an ORDERED command waited");
    assert.equal(core.tasks.running, 2);
    gate.open();
    for (const w of [held, headRead, ordered, simple]) assert.equal((await w.promise).status, ScsiStatus.GOOD);
    // ...and an ORDERED command that comes after a HEAD OF QUEUE one waits for it.
    gate.shut();
    const head2 = watch(a.execute(request(ALICE, cdb10(0x28, 2, 1), undefined, { attribute: "head-of-queue", expectedLength: 512 })));
    const ordered2 = watch(b.execute(request(BOB, [0x00, 0, 0, 0, 0, 0], undefined, { attribute: "ordered" })));
    await settle();
    assert.equal(ordered2.settled, false, "an ORDERED command overtook an earlier HEAD OF QUEUE one");
    gate.open();
    assert.equal((await head2.promise).status, ScsiStatus.GOOD);
    assert.equal((await ordered2.promise).status, ScsiStatus.GOOD);
  });
});

test("HEAD OF QUEUE does not hold back SIMPLE commands after it", async () => {
  await withGatedSessions(1, { reads: true }, async (gate, [lu]) => {
    assert.ok(lu !== undefined);
    gate.shut();
    const head = watch(lu.execute(request(ALICE, cdb10(0x28, 0, 1), undefined, { attribute: "head-of-queue", expectedLength: 512 })));
    const simple = watch(lu.execute(request(ALICE, cdb10(0x28, 1, 1), undefined, { expectedLength: 512 })));
    await settle();
    assert.equal(gate.held, 2, "the SIMPLE READ waited for the HEAD OF QUEUE one");
    gate.open();
    assert.equal((await head.promise).status, ScsiStatus.GOOD);
    assert.equal((await simple.promise).status, ScsiStatus.GOOD);
  });
});

test("an ORDERED command aborted while it waits never runs and releases the commands behind it", async () => {
  await abortedOrderedReleasesWaiters();
});

test("a SIMPLE command aborted while it waits behind an ORDERED one never runs; the others go on", async () => {
  await withGatedSessions(2, {}, async (gate, [a, b], core) => {
    assert.ok(a !== undefined && b !== undefined && a.abort !== undefined && b.abort !== undefined);
    gate.shut();
    const ordered = watch(a.execute(request(ALICE, cdb10(0x2a, 5, 1), block(5), { attribute: "ordered" })));
    const doomed = request(BOB, cdb10(0x2a, 6, 1), block(6));
    const aborted = watch(b.execute(doomed));
    const kept = watch(b.execute(request(BOB, cdb10(0x2a, 7, 1), block(7))));
    await settle();
    b.abort(doomed);
    assert.equal((await aborted.promise).status, ScsiStatus.TASK_ABORTED);
    // Aborting one that is not waiting (running, done or unknown) changes nothing.
    b.abort(doomed);
    a.abort(request(ALICE, [0x00, 0, 0, 0, 0, 0]));
    assert.equal(kept.settled, false, "the SIMPLE WRITE still waits for the ORDERED one");
    gate.open();
    assert.equal((await ordered.promise).status, ScsiStatus.GOOD);
    assert.equal((await kept.promise).status, ScsiStatus.GOOD);
    assert.equal(hex((await run(a, ALICE, cdb10(0x28, 5, 3))).dataIn), hex(Buffer.concat([block(5), block(0), block(7)])));
    assert.deepEqual([core.tasks.running, core.tasks.ordered, core.tasks.waitingCount], [0, 0, 0]);
  });
});

test("ORDERED commands run one at a time in arrival order, across three sessions", async () => {
  await withGatedSessions(3, {}, async (gate, lus) => {
    const who = [ALICE, BOB, CAROL];
    gate.shut();
    // Each ORDERED WRITE overwrites block 9; the last one to arrive must be the last to land.
    const writes = [0, 1, 2, 3, 4, 5].map((i) => watch(lus[i % 3]!.execute(request(who[i % 3]!, cdb10(0x2a, 9, 1), block(0x10 + i), { attribute: "ordered" }))));
    for (let expected = 1; expected <= 6; expected += 1) {
      await settle(10);
      assert.equal(gate.arrived, expected, "ORDERED commands ran together");
      // Let the one running through, then shut again behind it.
      gate.open();
      gate.shut();
    }
    gate.open();
    for (const w of writes) assert.equal((await w.promise).status, ScsiStatus.GOOD);
    assert.equal(hex((await run(lus[0]!, ALICE, cdb10(0x28, 9, 1))).dataIn), hex(block(0x15)));
  });
});

test("completion is counted once whether the command answers at once, later, or fails", async () => {
  await withGatedSessions(1, {}, async (gate, [lu], core) => {
    assert.ok(lu !== undefined && lu.executeNow !== undefined);
    const idle = (): number[] => [core.tasks.running, core.tasks.ordered, core.tasks.waitingCount];
    // Failures: out of range (CHECK CONDITION), an unknown opcode, NACA, as ORDERED and as SIMPLE.
    for (const attribute of ["ordered", "simple", "head-of-queue"] as const) {
      assert.equal(senseOf(await lu.execute(request(ALICE, cdb10(0x28, 4096, 1), undefined, { attribute }))), "05/21/00");
      assert.equal(senseOf(await lu.execute(request(ALICE, [0xff, 0, 0, 0, 0, 0], undefined, { attribute }))), "05/20/00");
      assert.equal(senseOf(await lu.execute(request(ALICE, [0x00, 0, 0, 0, 0, 0x04], undefined, { attribute }))), "05/24/00");
      assert.deepEqual(idle(), [0, 0, 0], attribute);
    }
    // A SIMPLE WRITE into the page cache: answered at once, never counted.
    const now = lu.executeNow(request(ALICE, cdb10(0x2a, 0, 1), block(9)));
    assert.ok(!(now instanceof Promise), "with nothing ORDERED, a SIMPLE WRITE is still answered synchronously");
    assert.deepEqual(idle(), [0, 0, 0]);
    // One that waits in the device: counted until it completes.
    gate.shut();
    const later = watch(lu.executeNow(request(ALICE, cdb10(0x2a, 1, 1), block(9))));
    await settle();
    assert.deepEqual(idle(), [1, 0, 0]);
    // With an ORDERED command in the set, executeNow gives a promise (it must wait).
    const ordered = watch(lu.executeNow(request(ALICE, cdb10(0x28, 1, 1), undefined, { attribute: "ordered", expectedLength: 512 })));
    const waits = lu.executeNow(request(ALICE, cdb10(0x2a, 2, 1), block(9)));
    assert.ok(waits instanceof Promise, "a SIMPLE command behind an ORDERED one answered at once");
    assert.deepEqual(idle(), [1, 1, 2]);
    gate.open();
    assert.equal((await later.promise).status, ScsiStatus.GOOD);
    assert.equal(hex((await ordered.promise).dataIn), hex(block(9)));
    assert.equal((await waits).status, ScsiStatus.GOOD);
    assert.deepEqual(idle(), [0, 0, 0]);
    assert.ok(!(lu.executeNow(request(ALICE, cdb10(0x2a, 3, 1), block(9))) instanceof Promise), "synchronous again once the ORDERED command is gone");
  });
});

test("a device failure of an ORDERED command still releases the commands behind it", async () => {
  await withGatedSessions(1, {}, async (gate, [lu], core) => {
    assert.ok(lu !== undefined);
    // The gated device passes read() through; make one fail as a disk does (EIO: MEDIUM ERROR).
    const read = gate.device.read.bind(gate.device);
    gate.device.read = () => Promise.reject(Object.assign(new Error("injected EIO"), { code: "EIO" }));
    try {
      const failed = lu.execute(request(ALICE, cdb10(0x28, 0, 1), undefined, { attribute: "ordered", expectedLength: 512 }));
      const after = lu.execute(request(ALICE, [0x00, 0, 0, 0, 0, 0]));
      assert.equal(senseOf(await failed), "03/11/00");
      assert.equal((await after).status, ScsiStatus.GOOD);
    } finally {
      gate.device.read = read;
    }
    assert.deepEqual([core.tasks.running, core.tasks.ordered, core.tasks.waitingCount], [0, 0, 0]);
  });
});

test("the ACA task attribute is refused (no ACA condition can exist: NACA is refused) and the command does not run", async () => {
  await withGatedSessions(1, {}, async (gate, [lu], core) => {
    assert.ok(lu !== undefined && lu.executeNow !== undefined);
    const aca = await lu.execute(request(ALICE, cdb10(0x2a, 0, 1), block(0xee), { attribute: "aca" }));
    // SAM-5: CHECK CONDITION, ILLEGAL REQUEST, INVALID MESSAGE ERROR (49h/00h).
    assert.equal(aca.status, ScsiStatus.CHECK_CONDITION);
    assert.equal(senseOf(aca), "05/49/00");
    assert.equal(senseOf(await lu.executeNow(request(ALICE, cdb10(0x28, 0, 1), undefined, { attribute: "aca", expectedLength: 512 }))), "05/49/00");
    assert.equal(gate.arrived, 0, "the ACA WRITE reached the device");
    assert.equal(hex((await run(lu, ALICE, cdb10(0x28, 0, 1))).dataIn), hex(block(0)));
    assert.deepEqual([core.tasks.running, core.tasks.ordered, core.tasks.waitingCount], [0, 0, 0]);
    // The refusal comes before a pending unit attention, which stays for the next command.
    lu.nexusAdded(ALICE);
    assert.equal(senseOf(await lu.execute(request(ALICE, [0x00, 0, 0, 0, 0, 0], undefined, { attribute: "aca" }))), "05/49/00");
    assert.equal(senseOf(await run(lu, ALICE, [0x00, 0, 0, 0, 0, 0])), "06/29/00");
  });
});
