// Units: a table (name, state word, address, capacity, used, free, volumes,
// current IOPS and throughput where the station keeps statistics),
// paged and filterable so 1,000 units render at once; and one unit's page:
// its volumes and partitions drawn as a map of LBA ranges with the free
// extents between them (after the seed's Fig. 5), and its I/O charts.

import type { JSX } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { call, describeError, seg } from "../api.ts";
import { type Model, useModel } from "../model.ts";
import type { StatsPoint, Unit, UnitWithVolumes, Volume } from "../types.ts";
import { Chart, Pager, StateWord, formatBytes, formatTime } from "../ui.tsx";
import { toSeconds } from "./pool.tsx";

export const UNITS_PAGE_SIZE = 100;
/** Statistics are re-read this often (the station polls its units every 5 s by default). */
export const STATS_REFRESH_MS = 5_000;
/** The unit's metadata area: its first 4 MiB (docs/unit.md); volume extents are absolute LBAs after it. */
export const METADATA_LBAS = 8192;
const LBA_BYTES = 512;

export function unitAddress(unit: Unit): string {
  if (unit.nbd !== null) return `${unit.nbd.host}:${unit.nbd.port}`;
  return unit.addresses[0] ?? "-";
}

/** Each unit's latest I/O rates (GET /api/v1/stats/units?window=30s), re-read every STATS_REFRESH_MS; empty where the station keeps none. */
function useLatestRates(): ReadonlyMap<string, StatsPoint> {
  const [rates, setRates] = useState<ReadonlyMap<string, StatsPoint>>(new Map());
  useEffect(() => {
    let stop = false;
    const read = (): void => {
      void call<{ items: { unit: string; points: StatsPoint[] }[] }>("GET", "/api/v1/stats/units?window=30s", { accept: [400, 404] })
        .then((a) => {
          if (stop || a.status !== 200) return;
          const latest = new Map<string, StatsPoint>();
          for (const item of a.body.items) {
            const last = item.points.at(-1);
            if (last !== undefined) latest.set(item.unit, last);
          }
          setRates(latest);
        })
        .catch(() => undefined);
    };
    read();
    const timer = setInterval(read, STATS_REFRESH_MS);
    return () => {
      stop = true;
      clearInterval(timer);
    };
  }, []);
  return rates;
}

export function UnitsPage({ model }: { model: Model }): JSX.Element {
  const s = useModel(model);
  const rates = useLatestRates();
  const [filter, setFilter] = useState("");
  const [offset, setOffset] = useState(0);
  const all = [...s.units.values()];
  const needle = filter.trim().toLowerCase();
  const shown = needle === "" ? all : all.filter((u) => u.name.toLowerCase().includes(needle) || u.state === needle);
  const page = shown.slice(offset, offset + UNITS_PAGE_SIZE);
  return (
    <section aria-labelledby="units-h">
      <h1 id="units-h">Units</h1>
      <div class="toolbar">
        <label for="unit-filter">Filter units</label>
        <input
          id="unit-filter"
          type="search"
          placeholder="name or state"
          value={filter}
          onInput={(e) => {
            setFilter(e.currentTarget.value);
            setOffset(0);
          }}
        />
      </div>
      {!s.unitsLoaded ? <p role="status">Loading units…</p> : null}
      <div class="table-wrap">
        <table class="grid" aria-label="Units">
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">State</th>
              <th scope="col">Address</th>
              <th scope="col" class="num">Capacity</th>
              <th scope="col" class="num">Used</th>
              <th scope="col" class="num">Free</th>
              <th scope="col" class="num">Volumes</th>
              <th scope="col" class="num">IOPS</th>
              <th scope="col" class="num">Throughput</th>
              <th scope="col">Zone</th>
            </tr>
          </thead>
          <tbody>
            {page.map((u) => (
              <tr key={u.name} data-unit={u.name}>
                <th scope="row">
                  <a href={`#/units/${encodeURIComponent(u.name)}`}>{u.name}</a>
                  {u.spare === true ? <span class="tag">spare</span> : null}
                </th>
                <td>
                  <StateWord state={u.state} />
                </td>
                <td>{unitAddress(u)}</td>
                <td class="num">{formatBytes(u.capacityBytes)}</td>
                <td class="num">{formatBytes(u.capacityBytes - u.freeBytes)}</td>
                <td class="num">{formatBytes(u.freeBytes)}</td>
                <td class="num">{u.volumeCount}</td>
                <td class="num">{rateText(rates.get(u.name), (p) => Math.round(p.readOps + p.writeOps).toString())}</td>
                <td class="num">{rateText(rates.get(u.name), (p) => `${formatBytes(p.readBytes + p.writeBytes)}/s`)}</td>
                <td>{u.zone ?? "-"}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <Pager offset={offset} pageSize={UNITS_PAGE_SIZE} total={shown.length} onOffset={setOffset} what="units" />
    </section>
  );
}

function rateText(point: StatsPoint | undefined, show: (p: StatsPoint) => string): string {
  return point === undefined ? "-" : show(point);
}

interface MapPiece {
  readonly kind: "volume" | "partition" | "free";
  readonly label: string;
  readonly startLba: number;
  readonly lengthLba: number;
  readonly color: string;
}

const COLORS = ["#2563eb", "#7c3aed", "#0891b2", "#c026d3", "#4f46e5", "#0d9488", "#9333ea", "#1d4ed8"];

/** A volume-relative LBA range mapped onto the volume's absolute extents (pieces, in order). */
export function mapRange(extents: readonly { startLba: number; lengthLba: number }[], start: number, length: number): { startLba: number; lengthLba: number }[] {
  const out: { startLba: number; lengthLba: number }[] = [];
  let base = 0;
  for (const extent of extents) {
    const from = Math.max(start, base);
    const to = Math.min(start + length, base + extent.lengthLba);
    if (to > from) out.push({ startLba: extent.startLba + (from - base), lengthLba: to - from });
    base += extent.lengthLba;
  }
  return out;
}

/** The unit's data area as pieces: every volume extent, every partition on them, and the free extents between. */
export function lbaMap(unit: Unit, volumes: readonly Volume[]): { pieces: MapPiece[]; firstLba: number; endLba: number } {
  const firstLba = METADATA_LBAS;
  const endLba = METADATA_LBAS + Math.floor(unit.capacityBytes / LBA_BYTES);
  const pieces: MapPiece[] = [];
  const used: { startLba: number; lengthLba: number }[] = [];
  volumes.forEach((volume, i) => {
    const color = COLORS[i % COLORS.length] ?? "#2563eb";
    for (const extent of volume.extents) {
      pieces.push({ kind: "volume", label: volume.name, startLba: extent.startLba, lengthLba: extent.lengthLba, color });
      used.push(extent);
    }
    for (const partition of volume.partitions) {
      for (const piece of mapRange(volume.extents, partition.startLba, partition.lengthLba)) {
        pieces.push({ kind: "partition", label: partition.name, ...piece, color });
      }
    }
  });
  used.sort((a, b) => a.startLba - b.startLba);
  let cursor = firstLba;
  for (const extent of used) {
    if (extent.startLba > cursor) pieces.push({ kind: "free", label: "free", startLba: cursor, lengthLba: extent.startLba - cursor, color: "#d1d5db" });
    cursor = Math.max(cursor, extent.startLba + extent.lengthLba);
  }
  if (endLba > cursor) pieces.push({ kind: "free", label: "free", startLba: cursor, lengthLba: endLba - cursor, color: "#d1d5db" });
  return { pieces, firstLba, endLba };
}

function LbaMap({ unit, volumes }: { unit: Unit; volumes: readonly Volume[] }): JSX.Element {
  const { pieces, firstLba, endLba } = lbaMap(unit, volumes);
  const span = Math.max(1, endLba - firstLba);
  const x = (lba: number): number => ((lba - firstLba) / span) * 1000;
  const free = pieces.filter((p) => p.kind === "free");
  return (
    <figure class="lba-map">
      <figcaption>
        LBA map of {unit.name}: LBA {firstLba} to {endLba - 1} ({formatBytes(unit.capacityBytes)}); {volumes.length} volumes, {free.length} free extents
      </figcaption>
      <svg viewBox="0 0 1000 64" preserveAspectRatio="none" role="img" aria-label={`LBA map of unit ${unit.name}`}>
        {pieces
          .filter((p) => p.kind !== "partition")
          .map((p) => (
            <rect key={`${p.kind}-${p.startLba}`} x={x(p.startLba)} y={4} width={Math.max(0.5, x(p.startLba + p.lengthLba) - x(p.startLba))} height={36} fill={p.color} stroke="#fff" stroke-width={0.5}>
              <title>{`${p.label}: LBA ${p.startLba}–${p.startLba + p.lengthLba - 1} (${formatBytes(p.lengthLba * LBA_BYTES)})`}</title>
            </rect>
          ))}
        {pieces
          .filter((p) => p.kind === "partition")
          .map((p) => (
            <rect key={`p-${p.label}-${p.startLba}`} x={x(p.startLba)} y={44} width={Math.max(0.5, x(p.startLba + p.lengthLba) - x(p.startLba))} height={16} fill={p.color} opacity={0.55} stroke="#111" stroke-width={0.5}>
              <title>{`partition ${p.label}: LBA ${p.startLba}–${p.startLba + p.lengthLba - 1} (${formatBytes(p.lengthLba * LBA_BYTES)})`}</title>
            </rect>
          ))}
      </svg>
      <table class="grid compact" aria-label={`Extents of unit ${unit.name}`}>
        <thead>
          <tr>
            <th scope="col">What</th>
            <th scope="col" class="num">First LBA</th>
            <th scope="col" class="num">Last LBA</th>
            <th scope="col" class="num">Size</th>
          </tr>
        </thead>
        <tbody>
          {[...pieces]
            .sort((a, b) => a.startLba - b.startLba || (a.kind === "partition" ? 1 : -1))
            .map((p) => (
              <tr key={`${p.kind}-${p.label}-${p.startLba}`} class={`piece-${p.kind}`}>
                <td>
                  <span class="swatch" style={{ background: p.color }} aria-hidden="true" />
                  {p.kind === "free" ? "free extent" : p.kind === "partition" ? `partition ${p.label}` : `volume ${p.label}`}
                </td>
                <td class="num">{p.startLba}</td>
                <td class="num">{p.startLba + p.lengthLba - 1}</td>
                <td class="num">{formatBytes(p.lengthLba * LBA_BYTES)}</td>
              </tr>
            ))}
        </tbody>
      </table>
    </figure>
  );
}

interface UnitStats {
  readonly points: readonly StatsPoint[];
  readonly volumes?: readonly { readonly volume: string; readonly points: readonly StatsPoint[] }[];
}


function IoCharts({ name }: { name: string }): JSX.Element {
  const [stats, setStats] = useState<UnitStats | null | undefined>(undefined);
  const [series, setSeries] = useState("");
  useEffect(() => {
    let stop = false;
    const read = (): void => {
      void call<UnitStats>("GET", `/api/v1/stats/units${seg(name)}?window=10m`, { accept: [400, 404] })
        .then((a) => !stop && setStats(a.status === 200 ? a.body : null))
        .catch(() => !stop && setStats(null));
    };
    read();
    const timer = setInterval(read, STATS_REFRESH_MS);
    return () => {
      stop = true;
      clearInterval(timer);
    };
  }, [name]);
  const points = series === "" ? stats?.points : stats?.volumes?.find((v) => v.volume === series)?.points;
  const data = useMemo(() => {
    const p = points ?? [];
    const t = p.map((q) => toSeconds(q.t));
    return {
      ops: [t, p.map((q) => q.readOps), p.map((q) => q.writeOps)],
      bytes: [t, p.map((q) => q.readBytes), p.map((q) => q.writeBytes)],
      latency: [t, p.map((q) => q.readLatencyMs), p.map((q) => q.writeLatencyMs)],
    };
  }, [points]);
  if (stats === undefined) return <p role="status">Loading statistics…</p>;
  if (stats === null || stats.points.length === 0) return <p>No statistics yet.</p>;
  const rw = [
    { label: "read", color: "#2563eb" },
    { label: "write", color: "#c2410c" },
  ];
  return (
    <>
      <div class="toolbar">
        <label for="io-series">Series</label>
        <select id="io-series" value={series} onChange={(e) => setSeries(e.currentTarget.value)}>
          <option value="">whole unit</option>
          {(stats.volumes ?? []).map((v) => (
            <option key={v.volume} value={v.volume}>
              volume {v.volume}
            </option>
          ))}
        </select>
      </div>
      <div class="charts" key={series}>
        <Chart title="IOPS" unit="ops/s" series={rw} data={data.ops} />
        <Chart title="Throughput" unit="per second" series={rw} data={data.bytes} bytes />
        <Chart title="Latency" unit="ms" series={rw} data={data.latency} />
      </div>
    </>
  );
}

export function UnitPage({ model, name }: { model: Model; name: string }): JSX.Element {
  const s = useModel(model);
  const [unit, setUnit] = useState<UnitWithVolumes | null>(null);
  const [error, setError] = useState<string | null>(null);
  const listed = s.units.get(name);
  useEffect(() => {
    call<UnitWithVolumes>("GET", `/api/v1/units${seg(name)}`)
      .then((a) => {
        setUnit(a.body);
        setError(null);
      })
      .catch((e: unknown) => setError(describeError(e)));
  }, [name, s.volumesVersion, listed?.state]);
  return (
    <section aria-labelledby="unit-h">
      <p>
        <a href="#/units">← Units</a>
      </p>
      <h1 id="unit-h">Unit {name}</h1>
      {error === null ? null : (
        <p class="status status-error" role="alert">
          {error}
        </p>
      )}
      {unit === null ? null : (
        <>
          <dl class="facts wide">
            <dt>State</dt>
            <dd>
              <StateWord state={listed?.state ?? unit.state} />
            </dd>
            <dt>Address</dt>
            <dd>{unitAddress(unit)}</dd>
            <dt>Control API</dt>
            <dd>{unit.control === null ? "none" : `${unit.control.host}:${unit.control.port}`}</dd>
            <dt>Capacity</dt>
            <dd>{formatBytes(unit.capacityBytes)}</dd>
            <dt>Used</dt>
            <dd>{formatBytes(unit.capacityBytes - unit.freeBytes)}</dd>
            <dt>Free</dt>
            <dd>{formatBytes(unit.freeBytes)}</dd>
            <dt>TLS</dt>
            <dd>{unit.tls ?? "-"}</dd>
            <dt>Zone</dt>
            <dd>{unit.zone ?? "-"}</dd>
            <dt>Last seen</dt>
            <dd>{formatTime(unit.lastSeenAt)}</dd>
          </dl>
          <h2>Volumes and free extents</h2>
          <LbaMap unit={unit} volumes={unit.volumes} />
          <h2>I/O</h2>
          <IoCharts name={name} />
        </>
      )}
    </section>
  );
}
