// Prometheus text exposition (format 0.0.4) without a client library: the
// few renderers the station's and the unit's /metrics share. Label values
// must come from bounded sets (states, codes, the unit's own export names).

export type Labels = Readonly<Record<string, string>>;

export function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function labelText(labels: Labels, extra = ""): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  if (extra !== "") parts.push(extra);
  return parts.length === 0 ? "" : `{${parts.join(",")}}`;
}

function renderFamily(type: "gauge" | "counter", name: string, help: string, samples: Iterable<readonly [Labels, number]>): string {
  let out = `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n`;
  for (const [labels, value] of samples) out += `${name}${labelText(labels)} ${value}\n`;
  return out;
}

/** A gauge family computed at scrape time. */
export function renderGauge(name: string, help: string, samples: Iterable<readonly [Labels, number]>): string {
  return renderFamily("gauge", name, help, samples);
}

/** A counter family read at scrape time (the name should end in _total). */
export function renderCounter(name: string, help: string, samples: Iterable<readonly [Labels, number]>): string {
  return renderFamily("counter", name, help, samples);
}

/** One labelled histogram: counts per bucket (not cumulative; the last one past every bound), and the sum. */
export interface HistogramSample {
  readonly labels: Labels;
  readonly counts: readonly number[];
  readonly sum: number;
}

/** A histogram family with upper bounds `boundsSeconds` (+Inf added). */
export function renderHistogram(name: string, help: string, boundsSeconds: readonly number[], samples: Iterable<HistogramSample>): string {
  let out = `# HELP ${name} ${help}\n# TYPE ${name} histogram\n`;
  for (const sample of samples) {
    let cumulative = 0;
    boundsSeconds.forEach((bound, i) => {
      cumulative += sample.counts[i] ?? 0;
      out += `${name}_bucket${labelText(sample.labels, `le="${bound}"`)} ${cumulative}\n`;
    });
    cumulative += sample.counts[boundsSeconds.length] ?? 0;
    out += `${name}_bucket${labelText(sample.labels, 'le="+Inf"')} ${cumulative}\n`;
    out += `${name}_sum${labelText(sample.labels)} ${sample.sum}\n${name}_count${labelText(sample.labels)} ${cumulative}\n`;
  }
  return out;
}
