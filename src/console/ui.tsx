// Small shared pieces of the console: sizes, times, state words, buttons that
// say why they are disabled, pagers, progress bars and uPlot charts.

import type { ComponentChildren, JSX } from "preact";
import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

const SIZE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes)) return "-";
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < SIZE_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value >= 100 ? 0 : 1)} ${SIZE_UNITS[unit]}`;
}

export function formatTime(iso: string | null | undefined): string {
  if (iso === null || iso === undefined) return "-";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString(undefined, { hour12: false });
}

/** A state word with a coloured mark; the word itself is the accessible content (never colour alone). */
export function StateWord({ state }: { state: string }): JSX.Element {
  return (
    <span class={`state state-${state}`}>
      <span class="dot" aria-hidden="true" />
      {state}
    </span>
  );
}

/** The id of the visible note saying why actions are disabled (aria-describedby). */
export const READ_ONLY_NOTE_ID = "read-only-note";

/** A button that, when `denied` is a reason, is disabled and says why (title and aria-describedby). */
export function ActionButton(props: {
  denied: string | null;
  onClick: () => void;
  children: ComponentChildren;
  label?: string;
  kind?: "primary" | "danger" | "plain";
  type?: "button" | "submit";
  busy?: boolean;
}): JSX.Element {
  const disabled = props.denied !== null || props.busy === true;
  return (
    <button
      type={props.type ?? "button"}
      class={`btn btn-${props.kind ?? "plain"}`}
      disabled={disabled}
      title={props.denied ?? undefined}
      aria-describedby={props.denied === null ? undefined : READ_ONLY_NOTE_ID}
      aria-label={props.label}
      onClick={props.type === "submit" ? undefined : props.onClick}
    >
      {props.children}
    </button>
  );
}

export function Pager(props: { offset: number; pageSize: number; total: number; onOffset: (offset: number) => void; what: string }): JSX.Element {
  const { offset, pageSize, total } = props;
  const last = Math.min(total, offset + pageSize);
  return (
    <nav class="pager" aria-label={`${props.what} pages`}>
      <button type="button" class="btn" disabled={offset === 0} onClick={() => props.onOffset(Math.max(0, offset - pageSize))}>
        Previous page
      </button>
      <span aria-live="polite">
        {total === 0 ? `no ${props.what}` : `${offset + 1}–${last} of ${total} ${props.what}`}
      </span>
      <button type="button" class="btn" disabled={last >= total} onClick={() => props.onOffset(offset + pageSize)}>
        Next page
      </button>
    </nav>
  );
}

export function ProgressBar(props: { done: number; total: number; label: string; text: string }): JSX.Element {
  const percent = props.total > 0 ? Math.min(100, Math.round((props.done / props.total) * 100)) : 0;
  return (
    <div class="progress" role="progressbar" aria-label={props.label} aria-valuemin={0} aria-valuemax={100} aria-valuenow={percent} aria-valuetext={props.text}>
      <div class="progress-fill" style={{ width: `${percent}%` }} />
      <span class="progress-text">{props.text}</span>
    </div>
  );
}

export interface ChartSeries {
  readonly label: string;
  readonly color: string;
}

/** A uPlot line chart of x = seconds since epoch and one array per series; resizes with its box. */
export function Chart(props: { title: string; series: readonly ChartSeries[]; data: readonly (readonly number[])[]; unit: string; bytes?: boolean }): JSX.Element {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  useEffect(() => {
    const element = box.current;
    if (element === null) return;
    const options: uPlot.Options = {
      width: Math.max(240, element.clientWidth),
      height: 180,
      series: [{}, ...props.series.map((s) => ({ label: s.label, stroke: s.color, width: 1.5 }))],
      axes: [{}, { label: props.unit, size: 80, ...(props.bytes === true ? { values: (_u: uPlot, values: number[]) => values.map((v) => formatBytes(v)) } : {}) }],
      legend: { show: true },
    };
    plot.current = new uPlot(options, props.data as uPlot.AlignedData, element);
    const resize = new ResizeObserver(() => plot.current?.setSize({ width: Math.max(240, element.clientWidth), height: 180 }));
    resize.observe(element);
    return () => {
      resize.disconnect();
      plot.current?.destroy();
      plot.current = null;
    };
    // The series are fixed per chart; data changes are applied below.
  }, [props.series.length]);
  useEffect(() => {
    plot.current?.setData(props.data as uPlot.AlignedData);
  }, [props.data]);
  return (
    <figure class="chart">
      <figcaption>{props.title}</figcaption>
      <div ref={box} role="img" aria-label={`${props.title} chart`} />
    </figure>
  );
}

export function Status(props: { message: { kind: "ok" | "error" | "info"; text: string } | null }): JSX.Element | null {
  if (props.message === null) return null;
  return (
    <p class={`status status-${props.message.kind}`} role={props.message.kind === "error" ? "alert" : "status"}>
      {props.message.text}
    </p>
  );
}
