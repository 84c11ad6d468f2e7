// Pool: units by state, capacity/used/free totals, hosts online, open alerts
// (units not online, failed assignments, failed tasks), capacity over time
// when the station keeps statistics.

import type { JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import { call } from "../api.ts";
import { type Model, useModel } from "../model.ts";
import { type Assignment, type Page, type PoolPoint, type Task, UNIT_STATE_WORDS } from "../types.ts";
import { Chart, StateWord, formatBytes, formatTime } from "../ui.tsx";

export function PoolPage({ model }: { model: Model }): JSX.Element {
  const s = useModel(model);
  const units = [...s.units.values()];
  const byState = new Map<string, number>(UNIT_STATE_WORDS.map((w) => [w, 0]));
  let capacity = 0;
  let free = 0;
  let volumes = 0;
  for (const unit of units) {
    byState.set(unit.state, (byState.get(unit.state) ?? 0) + 1);
    capacity += unit.capacityBytes;
    free += unit.freeBytes;
    volumes += unit.volumeCount;
  }
  const used = capacity - free;
  const hostsOnline = s.hosts.filter((h) => h.state === "online").length;
  const away = units.filter((u) => u.state !== "online");
  const [failedAssignments, setFailedAssignments] = useState<readonly Assignment[]>([]);
  const [failedTasks, setFailedTasks] = useState<readonly Task[] | null>(null);
  const [pool, setPool] = useState<readonly PoolPoint[] | null>(null);
  useEffect(() => {
    void call<Page<Assignment>>("GET", "/api/v1/assignments?all=true&state=failed&limit=20", { accept: [400, 404] }).then((a) => setFailedAssignments(a.status === 200 ? a.body.items : []));
  }, [s.assignmentsVersion]);
  useEffect(() => {
    void call<Page<Task>>("GET", "/api/v1/tasks?state=failed&limit=20", { accept: [400, 404] }).then((a) => setFailedTasks(a.status === 200 ? a.body.items : null));
  }, [s.tasksVersion]);
  useEffect(() => {
    void call<{ points: PoolPoint[] }>("GET", "/api/v1/stats/pool?window=24h", { accept: [400, 404] }).then((a) => setPool(a.status === 200 ? a.body.points : null));
  }, [s.unitsLoaded]);
  const alerts = away.length + failedAssignments.length + (failedTasks?.length ?? 0);
  return (
    <section aria-labelledby="pool-h">
      <h1 id="pool-h">Pool</h1>
      <div class="cards">
        <section class="card" aria-labelledby="c-units">
          <h2 id="c-units">Units</h2>
          <p class="big">{units.length}</p>
          <ul class="plain">
            {[...byState].map(([state, n]) => (
              <li key={state}>
                <StateWord state={state} /> {n}
              </li>
            ))}
          </ul>
        </section>
        <section class="card" aria-labelledby="c-cap">
          <h2 id="c-cap">Capacity</h2>
          <p class="big">{formatBytes(capacity)}</p>
          <div class="meter" role="meter" aria-label="Pool space used" aria-valuemin={0} aria-valuemax={capacity} aria-valuenow={used} aria-valuetext={`${formatBytes(used)} used of ${formatBytes(capacity)}`}>
            <div class="meter-fill" style={{ width: `${capacity > 0 ? (used / capacity) * 100 : 0}%` }} />
          </div>
          <dl class="facts">
            <dt>Used</dt>
            <dd>{formatBytes(used)}</dd>
            <dt>Free</dt>
            <dd>{formatBytes(free)}</dd>
            <dt>Volumes</dt>
            <dd>{volumes}</dd>
          </dl>
        </section>
        <section class="card" aria-labelledby="c-hosts">
          <h2 id="c-hosts">Hosts online</h2>
          <p class="big">
            {hostsOnline} / {s.hosts.length}
          </p>
        </section>
        <section class="card" aria-labelledby="c-alerts">
          <h2 id="c-alerts">Open alerts</h2>
          <p class="big">{alerts}</p>
        </section>
      </div>
      <section aria-labelledby="alerts-h">
        <h2 id="alerts-h">Alerts</h2>
        {alerts === 0 ? <p>No open alerts: every unit is online, no assignment or task failed.</p> : null}
        <ul class="alerts">
          {away.slice(0, 50).map((u) => (
            <li key={`u-${u.name}`}>
              Unit <a href={`#/units/${encodeURIComponent(u.name)}`}>{u.name}</a> is <StateWord state={u.state} /> (last seen {formatTime(u.lastSeenAt)})
            </li>
          ))}
          {away.length > 50 ? <li>… and {away.length - 50} more units not online</li> : null}
          {failedAssignments.map((a) => (
            <li key={`a-${a.id}`}>
              Assignment {a.id} of {a.unit}/{a.volume} to {a.host} failed: {a.error ?? "no reason recorded"}
            </li>
          ))}
          {(failedTasks ?? []).map((t) => (
            <li key={`t-${t.id}`}>
              Task {t.id} ({t.kind}) failed: {t.error?.message ?? t.message ?? "no reason recorded"}
            </li>
          ))}
        </ul>
      </section>
      <section aria-labelledby="cap-h">
        <h2 id="cap-h">Capacity over time</h2>
        {pool === null || pool.length === 0 ? (
          <p>No statistics yet.</p>
        ) : (
          <Chart
            title="Pool capacity"
            unit="space"
            bytes
            series={[
              { label: "used", color: "#c2410c" },
              { label: "free", color: "#15803d" },
            ]}
            data={[pool.map((p) => toSeconds(p.t)), pool.map((p) => p.usedBytes), pool.map((p) => p.freeBytes)]}
          />
        )}
      </section>
    </section>
  );
}

/** A statistics point's time (ms number or ISO string) as uPlot's seconds. */
export function toSeconds(t: number | string): number {
  return (typeof t === "number" ? t : Date.parse(t)) / 1000;
}
