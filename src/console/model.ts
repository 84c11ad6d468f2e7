// The console's live model of the pool: units, hosts, tasks and the recent
// events, loaded from the REST API and kept current from the event stream.
// Events are coalesced: they are queued and applied together at most every
// FLUSH_MS, then views re-render once; a unit's state change is applied from
// the event itself, other changes re-read only the units they name (or the
// whole list when many changed at once). Pages that show paged data (volumes,
// assignments) watch the version counters and re-read their own page.

import { useEffect, useState } from "preact/hooks";
import { call, get, seg } from "./api.ts";
import { openEventStream, type StreamState } from "./events.ts";
import type { Host, Page, StationEvent, Task, Unit, UnitState, Who } from "./types.ts";

/** Events are applied in batches at most this often. */
export const FLUSH_MS = 100;
/** Events kept for the Events page. */
export const EVENTS_KEPT = 500;
/** Above this many changed units in one batch, the whole list is read again. */
const UNIT_REFETCH_ONE_BY_ONE_MAX = 20;
/** Tasks kept in memory (the Tasks page reads pages from the station). */
const TASKS_KEPT = 1_000;

export interface ModelState {
  who: Who | null;
  units: Map<string, Unit>;
  unitsLoaded: boolean;
  hosts: Host[];
  tasks: Map<string, Task>;
  /** null: the station has no task routes (GET /api/v1/tasks answered 404). */
  tasksAvailable: boolean | null;
  events: StationEvent[];
  stream: { state: StreamState; detail: string };
  /** Bumped when volumes / assignments / tasks may have changed. */
  volumesVersion: number;
  assignmentsVersion: number;
  tasksVersion: number;
  /** Bumped on every applied batch (views re-render). */
  version: number;
  /** When the last batch was applied (performance.now()), for the scale benchmark. */
  lastFlushAt: number;
  error: string | null;
}

type Listener = () => void;

export class Model {
  readonly state: ModelState = {
    who: null,
    units: new Map(),
    unitsLoaded: false,
    hosts: [],
    tasks: new Map(),
    tasksAvailable: null,
    events: [],
    stream: { state: "connecting", detail: "" },
    volumesVersion: 0,
    assignmentsVersion: 0,
    tasksVersion: 0,
    version: 0,
    lastFlushAt: 0,
    error: null,
  };
  private readonly listeners = new Set<Listener>();
  private queue: StationEvent[] = [];
  private flushTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly abort = new AbortController();
  private unitListInFlight: Promise<void> | null = null;
  private unitListAgain = false;
  private hostsInFlight = false;

  subscribe(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private changed(): void {
    this.state.version += 1;
    for (const listener of this.listeners) listener();
  }

  /** Loads everything and opens the event stream. */
  async start(who: Who): Promise<void> {
    this.state.who = who;
    openEventStream(
      {
        event: (event) => this.enqueue(event),
        state: (state, detail) => {
          this.state.stream = { state, detail };
          // After a gap the stream replays what it can; re-read the lists too.
          if (state === "live" && this.state.unitsLoaded) void this.reload();
          this.changed();
        },
      },
      this.abort.signal,
    );
    await this.reload();
  }

  stop(): void {
    this.abort.abort();
    if (this.flushTimer !== null) clearTimeout(this.flushTimer);
  }

  async reload(): Promise<void> {
    await Promise.all([this.loadUnits(), this.loadHosts(), this.loadTasks()]);
    this.state.volumesVersion += 1;
    this.state.assignmentsVersion += 1;
    this.changed();
  }

  /** GET /api/v1/units; one read at a time, one more if asked meanwhile. */
  loadUnits(): Promise<void> {
    if (this.unitListInFlight !== null) {
      this.unitListAgain = true;
      return this.unitListInFlight;
    }
    const run = async (): Promise<void> => {
      do {
        this.unitListAgain = false;
        const list = await get<{ items: Unit[] }>("/api/v1/units");
        const units = new Map<string, Unit>();
        for (const unit of [...list.items].sort((a, b) => a.name.localeCompare(b.name))) units.set(unit.name, unit);
        this.state.units = units;
        this.state.unitsLoaded = true;
      } while (this.unitListAgain);
    };
    this.unitListInFlight = run().finally(() => {
      this.unitListInFlight = null;
      this.changed();
    });
    return this.unitListInFlight;
  }

  async loadHosts(): Promise<void> {
    if (this.hostsInFlight) return;
    this.hostsInFlight = true;
    try {
      const list = await get<{ items: Host[] }>("/api/v1/hosts");
      this.state.hosts = [...list.items].sort((a, b) => a.name.localeCompare(b.name));
    } finally {
      this.hostsInFlight = false;
      this.changed();
    }
  }

  async loadTasks(): Promise<void> {
    const answer = await call<Page<Task>>("GET", "/api/v1/tasks?limit=100", { accept: [404] });
    if (answer.status === 404) {
      this.state.tasksAvailable = false;
      return;
    }
    this.state.tasksAvailable = true;
    for (const task of answer.body.items) this.state.tasks.set(task.id, task);
    this.trimTasks();
  }

  /** A task the console just started (202 + task view), shown before its events arrive. */
  noteTask(task: Task): void {
    this.state.tasks.set(task.id, task);
    this.state.tasksAvailable = true;
    this.state.tasksVersion += 1;
    this.changed();
  }

  private trimTasks(): void {
    if (this.state.tasks.size <= TASKS_KEPT) return;
    const newest = [...this.state.tasks.values()].sort((a, b) => b.createdAt.localeCompare(a.createdAt)).slice(0, TASKS_KEPT);
    this.state.tasks = new Map(newest.map((t) => [t.id, t]));
  }

  private enqueue(event: StationEvent): void {
    this.queue.push(event);
    if (this.flushTimer === null) this.flushTimer = setTimeout(() => this.flush(), FLUSH_MS);
  }

  /** Applies every queued event, then re-renders once. */
  private flush(): void {
    this.flushTimer = null;
    const batch = this.queue;
    this.queue = [];
    const s = this.state;
    const unitsToRead = new Set<string>();
    let hosts = false;
    for (const event of batch) {
      const data = event.data;
      switch (event.type) {
        case "unit": {
          const name = typeof data["name"] === "string" ? data["name"] : event.subject;
          const known = s.units.get(name);
          if (event.action === "state" && known !== undefined && typeof data["state"] === "string") {
            s.units.set(name, { ...known, state: data["state"] as UnitState });
          } else unitsToRead.add(name);
          break;
        }
        case "volumes": {
          const unit = typeof data["unit"] === "string" ? data["unit"] : event.subject;
          unitsToRead.add(unit);
          s.volumesVersion += 1;
          break;
        }
        case "host":
          hosts = true;
          s.assignmentsVersion += 1;
          break;
        case "assignment":
          s.assignmentsVersion += 1;
          s.volumesVersion += 1;
          break;
        case "task": {
          const task = data as unknown as Task;
          if (typeof task.id === "string") s.tasks.set(task.id, task);
          s.tasksAvailable = true;
          s.tasksVersion += 1;
          break;
        }
        default:
          break;
      }
    }
    s.events = [...batch.reverse(), ...s.events].slice(0, EVENTS_KEPT);
    this.trimTasks();
    s.lastFlushAt = performance.now();
    this.changed();
    if (unitsToRead.size > UNIT_REFETCH_ONE_BY_ONE_MAX) void this.loadUnits().catch((e: unknown) => this.fail(e));
    else for (const name of unitsToRead) void this.loadUnit(name).catch((e: unknown) => this.fail(e));
    if (hosts) void this.loadHosts().catch((e: unknown) => this.fail(e));
  }

  private async loadUnit(name: string): Promise<void> {
    const answer = await call<Unit & { volumes?: unknown }>("GET", `/api/v1/units${seg(name)}`, { accept: [404] });
    const units = new Map(this.state.units);
    if (answer.status === 404) units.delete(name);
    else {
      const { volumes: _volumes, ...unit } = answer.body;
      units.set(name, unit);
    }
    // Keep the list in name order (a new unit lands in its place).
    this.state.units = new Map([...units].sort((a, b) => a[0].localeCompare(b[0])));
    this.changed();
  }

  private fail(error: unknown): void {
    this.state.error = error instanceof Error ? error.message : String(error);
    this.changed();
  }
}

/** Re-renders the calling component whenever the model changes. */
export function useModel(model: Model): ModelState {
  const [, setVersion] = useState(0);
  useEffect(() => model.subscribe(() => setVersion(model.state.version)), [model]);
  return model.state;
}

/** May this caller change the pool? (unknown role: yes, and the station refuses if not). */
export function canWrite(who: Who | null): boolean {
  return who === null || who.role === "admin" || who.role === "operator";
}
