// The cluster node in process, against a real single-member etcd: the
// leader's writes reach the log in order, a snapshot replaces the log once
// enough entries were appended (the log up to it is deleted), and a station
// that starts afterwards builds its copy from that snapshot plus the entries
// after it, equal to the leader's table by table; and a second node follows
// the leader's writes as they come.

import { after, before, test } from "node:test";
import { randomBytes } from "node:crypto";
import assert from "node:assert/strict";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { until } from "../../testing/stations.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { StationStore } from "../store.ts";
import type { Db } from "../db.ts";
import { EtcdState } from "./etcd_log.ts";
import { buildLocalCopy, ClusterNode } from "./node.ts";
import { tableDigests } from "./migrate.ts";
import { appliedSeq } from "./recorder.ts";

let etcd: EtcdCluster;
let dirs: TempDir;

before(async () => {
  etcd = await startEtcdCluster({ members: 1, prefix: "node" });
  dirs = makeTempDir("cluster-node", memoryTmpBase());
});
after(async () => {
  await etcd?.stop();
  dirs?.remove();
});

test("the leader's writes go to the log, a snapshot compacts it, and copies built later or following along are equal", async () => {
  const state = new EtcdState(etcd.endpoints);
  let leaderStore: StationStore | null = null;
  let leaderDb: Db | null = null;
  let durable: (() => Promise<void>) | null = null;
  const leader = new ClusterNode({
    etcd: state,
    dbPath: dirs.file("leader.db"),
    url: "http://127.0.0.1:1",
    snapshotEveryEntries: 50,
    startServices: async (db, isDurable) => {
      leaderDb = db;
      leaderStore = new StationStore(db);
      durable = isDurable;
      return { handle: () => undefined, close: async () => undefined };
    },
  });
  const followerState = new EtcdState(etcd.endpoints);
  const follower = new ClusterNode({ etcd: followerState, dbPath: dirs.file("follower.db"), url: "http://127.0.0.1:2", startServices: async () => assert.fail("the follower must not lead") });
  try {
    await leader.start();
    assert.equal(leader.role, "leader");
    await follower.start();
    assert.equal(follower.role, "follower");
    assert.equal(follower.leader?.url, "http://127.0.0.1:1");

    for (let i = 0; i < 130; i++) leaderStore!.putHost(`h${i}`, `127.0.0.${(i % 200) + 2}`);
    await durable!();
    // The snapshot is written after the appends, in the background.
    await until("a snapshot after enough entries", async () => ((await state.snapshotManifest())?.seq ?? 0) >= 100, 10_000);
    const manifest = (await state.snapshotManifest())!;
    const firstLogged = (await state.entriesAfter(manifest.seq))[0]?.seq ?? manifest.seq + 1;
    assert.equal(firstLogged, manifest.seq + 1, "the log continues right after the snapshot");
    const compacted = await state.client.getAll().prefix(state.key("log/")).keys();
    assert.ok(compacted.every((key) => Number(key.slice(state.key("log/").length)) > manifest.seq), "the log up to the snapshot is deleted");

    const late = await buildLocalCopy(state, dirs.file("late.db"));
    try {
      assert.equal(appliedSeq(late.db), appliedSeq(leaderDb!), "the late copy reached the leader's entry");
      assert.deepEqual(tableDigests(late.db), tableDigests(leaderDb!), "and equals it table by table");
    } finally {
      late.db.close();
    }
    await until("the follower has applied every entry", async () => follower.appliedSeq === appliedSeq(leaderDb!), 10_000).catch(async (error: unknown) => {
      throw new Error(`${String(error)}: follower at ${follower.appliedSeq} (${follower.role}, ${follower.lastProblem ?? "no problem"}), leader at ${appliedSeq(leaderDb!)}, etcd's last ${await state.lastSeq()}`);
    });
  } finally {
    await follower.stop();
    await leader.stop();
    followerState.close();
    state.close();
  }
});

test("a copy is built from a log whose entries do not fit one read (more than the client's 4 MiB message limit)", async () => {
  const state = new EtcdState(etcd.endpoints);
  let leaderDb: Db | null = null;
  let durable: (() => Promise<void>) | null = null;
  const leader = new ClusterNode({
    etcd: state,
    dbPath: dirs.file("big-leader.db"),
    url: "http://127.0.0.1:3",
    startServices: async (db, isDurable) => {
      leaderDb = db;
      durable = isDurable;
      return { handle: () => undefined, close: async () => undefined };
    },
  });
  try {
    await state.client.delete().all();
    await leader.start();
    // 40 entries of about 150 KB that do not compress (random): 6 MB after the snapshot, under the 8 MiB that would call for another.
    const insert = leaderDb!.prepare("INSERT INTO events (at, type, action, subject, data) VALUES (?, ?, ?, ?, ?)");
    for (let i = 0; i < 40; i++) insert.run(i, "unit", "big", `s${i}`, JSON.stringify(randomBytes(112_000).toString("base64")));
    // One transaction of 3 MB of SQL text, more than an entry may hold uncompressed: stored gzip'd, the leader keeps leading.
    leaderDb!.transaction(() => {
      for (let i = 0; i < 3_000; i++) insert.run(i, "unit", "many", `m${i}`, JSON.stringify({ volume: `v${i}`, note: "a unit's report with its volumes repeats itself".repeat(20) }));
    })();
    await durable!();
    assert.equal(leader.role, "leader", "a large but compressible change is kept, not a reason to step down");
    const stored = await state.client.get(state.key(`log/${String(appliedSeq(leaderDb!)).padStart(20, "0")}`)).buffer();
    assert.ok(stored !== null && stored[0] === 0x1f && stored[1] === 0x8b && stored.length < 1024 * 1024, `the large entry is stored gzip'd (${stored?.length} bytes)`);
    const manifest = await state.snapshotManifest();
    assert.ok(manifest !== null && manifest.seq < 10, "no snapshot since the start: the copy has to read the whole log");
    const reader = new EtcdState(etcd.endpoints);
    try {
      const copy = await buildLocalCopy(reader, dirs.file("big-copy.db"));
      try {
        assert.equal(appliedSeq(copy.db), appliedSeq(leaderDb!));
        assert.deepEqual(tableDigests(copy.db), tableDigests(leaderDb!));
      } finally {
        copy.db.close();
      }
    } finally {
      reader.close();
    }
  } finally {
    await leader.stop();
    state.close();
  }
});
