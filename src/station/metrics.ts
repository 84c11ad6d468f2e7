// Prometheus text exposition (format 0.0.4) without a client library: a few
// counters, gauges computed at scrape time, and one histogram. Label values
// come only from fixed sets (states, status codes, reasons named by code), so
// the number of series stays bounded.

import { escapeLabel } from "../util/prometheus.ts";

/** Distinct label sets one counter keeps; more are folded into "other". */
export const COUNTER_SERIES_MAX = 64;

export class Counter {
  readonly values = new Map<string, number>();
  readonly name: string;
  readonly help: string;
  readonly label: string;
  constructor(name: string, help: string, label: string) {
    this.name = name;
    this.help = help;
    this.label = label;
  }
  inc(labelValue: string, by = 1): void {
    const key = this.values.has(labelValue) || this.values.size < COUNTER_SERIES_MAX ? labelValue : "other";
    this.values.set(key, (this.values.get(key) ?? 0) + by);
  }
  render(): string {
    let out = `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} counter\n`;
    for (const [value, count] of this.values) out += `${this.name}{${this.label}="${escapeLabel(value)}"} ${count}\n`;
    return out;
  }
}

export class Histogram {
  readonly name: string;
  readonly help: string;
  readonly bucketsSeconds: readonly number[];
  private readonly counts: number[];
  private sum = 0;
  private count = 0;
  constructor(name: string, help: string, bucketsSeconds: readonly number[]) {
    this.name = name;
    this.help = help;
    this.bucketsSeconds = bucketsSeconds;
    this.counts = bucketsSeconds.map(() => 0);
  }
  observe(seconds: number): void {
    this.sum += seconds;
    this.count += 1;
    this.bucketsSeconds.forEach((bound, i) => {
      if (seconds <= bound) this.counts[i] = (this.counts[i] ?? 0) + 1;
    });
  }
  render(): string {
    let out = `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} histogram\n`;
    this.bucketsSeconds.forEach((bound, i) => {
      out += `${this.name}_bucket{le="${bound}"} ${this.counts[i] ?? 0}\n`;
    });
    out += `${this.name}_bucket{le="+Inf"} ${this.count}\n${this.name}_sum ${this.sum}\n${this.name}_count ${this.count}\n`;
    return out;
  }
}

// The renderers shared with the unit's /metrics (src/util/prometheus.ts).
export { escapeLabel, renderGauge } from "../util/prometheus.ts";

export class StationMetrics {
  readonly httpRequests = new Counter("ipsan_station_http_requests_total", "HTTP requests answered, by status code", "status");
  readonly unitCalls = new Counter("ipsan_station_unit_calls_total", "Calls to units' control APIs, by result", "result");
  readonly allocations = new Counter("ipsan_station_allocations_total", "Allocation requests, by outcome", "outcome");
  readonly allocationSeconds = new Histogram(
    "ipsan_station_allocation_seconds",
    "Time from an allocation request to its answer (placed, told the unit, recorded)",
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  );
}
