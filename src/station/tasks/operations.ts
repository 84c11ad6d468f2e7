// The station's state-changing operations as tasks (docs/api.md "Tasks",
// kinds table): what each kind locks, whether it can be cancelled, what it
// answers when done (exactly what the synchronous API answered before tasks),
// and what a restart that interrupted it leaves to reconcile. The HTTP layer
// validates the request, calls one of these, and answers with answerTask.

import type { Principal } from "../auth/tokens.ts";
import type { AllocationInput, AssignInput, Station } from "../station.ts";
import type { StationStore } from "../store.ts";
import { assignmentView, volumeView } from "../views.ts";
import type { AssignmentRecord } from "../types.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { INTERRUPTED_MESSAGE, TaskRunner, type TaskActor, type TaskAnswer, type TaskRunnerOptions, type TaskSpec } from "./runner.ts";
import type { TaskRecord } from "./types.ts";
import { WIPE_CHUNK_BYTES_DEFAULT, checkWipeAllowed, wipeVolume } from "./wipe.ts";

const log = logger("tasks");

/** The starter of the tasks the station starts by itself (leg replacements). */
export const STATION_ACTOR: TaskActor = { name: "station", role: "station" };

const ONE_UNIT_CALL = "it is one call to the unit, which the unit makes whole or not at all";
const PENDING_ASSIGNMENT = "a pending assignment is finished or undone by reconcile, never left half made";

export interface StationTasksOptions extends Omit<TaskRunnerOptions, "interrupted"> {
  /** Bytes per call of a volume.wipe (WIPE_CHUNK_BYTES_DEFAULT; $IPSAN_WIPE_CHUNK_BYTES in the station). */
  readonly wipeChunkBytes?: number;
}

/** The assignment an allocation or manual assignment task recorded (found by its requestId), if any. */
function assignmentOf(store: StationStore, task: TaskRecord): AssignmentRecord | undefined {
  const requestId = typeof task.params?.["requestId"] === "string" ? task.params["requestId"] : null;
  const assignmentId = requestId === null ? null : (store.findRequest(requestId)?.assignmentId ?? null);
  return assignmentId === null ? undefined : store.getAssignment(assignmentId);
}

/** What reconcile does for a task of `task.kind` that a restart interrupted (the end of its message). */
export function interruptedDetail(store: StationStore, task: TaskRecord): string {
  const target = `${task.target.type} ${task.target.id}`;
  switch (task.kind) {
    case "volume.create":
    case "volume.delete":
    case "volume.grow":
    case "volume.partition":
      return `the unit's next report shows whether ${target} was changed (the station keeps what the unit reports)`;
    case "volume.wipe": {
      const progress = task.progress;
      const how = progress === null ? "" : ` (at least ${progress.done} of ${progress.total} bytes were zeroed)`;
      return `${target} is partly zeroed${how}; start the wipe again to finish it`;
    }
    case "leg.replace":
      return `the replacement loop carries it on from what it recorded: finished (event leg-replaced) or undone (event leg-replacement-undone)`;
    case "assignment.delete": {
      const assignment = store.getAssignment(task.target.id);
      if (assignment === undefined) return `reconcile finishes the revoke of ${target}`;
      if (assignment.state === "released") return `${target} was released before the restart`;
      if (assignment.state === "revoking") return `reconcile finishes the revoke of ${target} (its grant is taken off when its unit answers)`;
      return `${target} is still ${assignment.state}: nothing was revoked; unassign it again`;
    }
    case "allocation":
    case "assignment.create": {
      const requestId = typeof task.params?.["requestId"] === "string" ? task.params["requestId"] : null;
      const assignment = assignmentOf(store, task);
      if (assignment === undefined) {
        return requestId === null
          ? "reconcile finishes or undoes any pending assignment it recorded"
          : `no assignment was recorded for request ${requestId} (or it was undone): ask again`;
      }
      if (assignment.state === "pending") return `reconcile finishes or undoes pending assignment ${assignment.id}`;
      if (assignment.state === "failed") return `assignment ${assignment.id} was undone: ${assignment.error ?? "failed"}`;
      return `assignment ${assignment.id} was finished (${assignment.state}); ask again with requestId ${requestId} for its answer`;
    }
  }
}

/** The station's operations started as tasks: one method per kind. */
export class StationTasks {
  readonly runner: TaskRunner;
  private readonly station: Station;
  private readonly wipeChunkBytes: number;

  constructor(station: Station, options: StationTasksOptions = {}) {
    this.station = station;
    this.wipeChunkBytes = options.wipeChunkBytes ?? WIPE_CHUNK_BYTES_DEFAULT;
    const store = station.store;
    const interrupted: TaskRecord[] = [];
    this.runner = new TaskRunner(store, {
      ...options,
      interrupted: (task) => {
        interrupted.push(task);
        return interruptedDetail(store, task);
      },
    });
    this.followReconcile(interrupted);
    this.followLegReplacements();
  }

  /** Replacements under way, by "assignment/leg": how their leg.replace task ends. */
  private readonly replacing = new Map<string, { resolve(answer: TaskAnswer): void; reject(error: unknown): void }>();

  /**
   * Leg replacements (replacement.ts) are started by the station's own loop:
   * each shows as a task "leg.replace" (started by "station") from its
   * leg-replacing event to its leg-replaced (succeeded) or
   * leg-replacement-undone (failed) event. It holds no object (the loop owns
   * the assignment's lock while it works) and cannot be cancelled.
   */
  private followLegReplacements(): void {
    this.station.store.subscribe((event) => {
      if (event.type !== "assignment") return;
      const data = (event.data ?? {}) as { leg?: unknown; reason?: unknown };
      const key = `${event.subject}/${String(data.leg)}`;
      if (event.action === "leg-replacing") {
        if (this.replacing.has(key)) return;
        let settle = { resolve: (_: TaskAnswer): void => undefined, reject: (_: unknown): void => undefined };
        const outcome = new Promise<TaskAnswer>((resolve, reject) => (settle = { resolve, reject }));
        this.replacing.set(key, settle);
        // After this event has reached every subscriber.
        queueMicrotask(() => {
          try {
            this.runner.start(
            {
              kind: "leg.replace",
              target: { type: "assignment", id: event.subject },
              objects: [],
              notCancellable: "the replacement loop owns it: it finishes or undoes the replacement itself",
              params: { assignment: event.subject, leg: data.leg ?? null },
              run: () => outcome,
            },
            STATION_ACTOR,
          );
          } catch (error) {
            // Only the bound on unfinished tasks can refuse it: the replacement goes on without its task.
            this.replacing.delete(key);
            log.warn("cannot show a leg replacement as a task", { assignment: event.subject, leg: String(data.leg), error: errorMessage(error) });
          }
        });
        return;
      }
      const waiting = this.replacing.get(key);
      if (waiting === undefined) return;
      if (event.action === "leg-replaced") {
        this.replacing.delete(key);
        waiting.resolve({ status: 200, body: event.data });
      } else if (event.action === "leg-replacement-undone") {
        this.replacing.delete(key);
        const reason = typeof data.reason === "string" ? `: ${data.reason}` : "";
        waiting.reject(new IpsanError("CONFLICT", `replacement of leg ${String(data.leg)} of assignment ${event.subject} undone${reason}`));
      }
    });
  }

  /**
   * An interrupted allocation or assignment whose assignment is still pending:
   * when reconcile finishes or undoes it, the task's message says which.
   */
  private followReconcile(interrupted: readonly TaskRecord[]): void {
    const store = this.station.store;
    const awaiting = new Map<string, string>();
    for (const task of interrupted) {
      const assignment = task.kind === "allocation" || task.kind === "assignment.create" ? assignmentOf(store, task) : undefined;
      if (assignment?.state === "pending") awaiting.set(assignment.id, task.id);
    }
    if (awaiting.size === 0) return;
    const unsubscribe = store.subscribe((event) => {
      const taskId = event.type === "assignment" ? awaiting.get(event.subject) : undefined;
      if (taskId === undefined || (event.action !== "active" && event.action !== "failed")) return;
      awaiting.delete(event.subject);
      if (awaiting.size === 0) unsubscribe();
      const error = (event.data as { error?: unknown } | null)?.error;
      const outcome =
        event.action === "active"
          ? `reconcile finished assignment ${event.subject} (active)`
          : `reconcile undid assignment ${event.subject} (failed${typeof error === "string" ? `: ${error}` : ""})`;
      // After this event has reached every subscriber: the task's change is published after it.
      queueMicrotask(() => this.runner.amendMessage(taskId, `${INTERRUPTED_MESSAGE}: ${outcome}`));
    });
  }

  private assignedTo(unit: string, volume: string): string | null {
    return this.station.store.liveOnVolume(unit, volume)[0]?.host ?? null;
  }

  private start(spec: TaskSpec, principal: Principal): TaskRecord {
    return this.runner.start(spec, principal);
  }

  createVolume(principal: Principal, unit: string, name: string, sizeBytes: number): TaskRecord {
    return this.start(
      {
        kind: "volume.create",
        target: { type: "volume", id: `${unit}/${name}` },
        objects: [`volume:${unit}/${name}`],
        notCancellable: ONE_UNIT_CALL,
        run: async () => ({ status: 201, body: volumeView(await this.station.createVolume(unit, name, sizeBytes), null, this.station.store.enrolledUnitId(unit)) }),
      },
      principal,
    );
  }

  deleteVolume(principal: Principal, unit: string, name: string): TaskRecord {
    return this.start(
      {
        kind: "volume.delete",
        target: { type: "volume", id: `${unit}/${name}` },
        objects: [`volume:${unit}/${name}`],
        notCancellable: ONE_UNIT_CALL,
        run: async () => {
          await this.station.deleteVolume(unit, name);
          return { status: 204 };
        },
      },
      principal,
    );
  }

  growVolume(principal: Principal, unit: string, name: string, sizeBytes: number): TaskRecord {
    return this.start(
      {
        kind: "volume.grow",
        target: { type: "volume", id: `${unit}/${name}` },
        objects: [`volume:${unit}/${name}`],
        notCancellable: ONE_UNIT_CALL,
        run: async () => ({ status: 200, body: volumeView(await this.station.growVolume(unit, name, sizeBytes), this.assignedTo(unit, name), this.station.store.enrolledUnitId(unit)) }),
      },
      principal,
    );
  }

  partitionVolume(principal: Principal, unit: string, name: string, sizesBytes: readonly number[]): TaskRecord {
    return this.start(
      {
        kind: "volume.partition",
        target: { type: "volume", id: `${unit}/${name}` },
        objects: [`volume:${unit}/${name}`],
        notCancellable: ONE_UNIT_CALL,
        run: async () => ({ status: 200, body: volumeView(await this.station.partitionVolume(unit, name, sizesBytes), this.assignedTo(unit, name), this.station.store.enrolledUnitId(unit)) }),
      },
      principal,
    );
  }

  /** Refused at once (404, 409) for a volume that is not there or is assigned; else a cancellable task. */
  wipeVolume(principal: Principal, unit: string, name: string): TaskRecord {
    checkWipeAllowed(this.station, unit, name);
    return this.start(
      {
        kind: "volume.wipe",
        target: { type: "volume", id: `${unit}/${name}` },
        objects: [`volume:${unit}/${name}`],
        notCancellable: null,
        run: (ctx) => wipeVolume(this.station, unit, name, this.wipeChunkBytes, ctx),
      },
      principal,
    );
  }

  /** A manual assignment: holds the volume (or only the partition it assigns). */
  assign(principal: Principal, input: AssignInput): TaskRecord {
    const volumeKey = `volume:${input.unit}/${input.volume}`;
    return this.start(
      {
        kind: "assignment.create",
        target: { type: "volume", id: `${input.unit}/${input.volume}` },
        objects: [input.partition === undefined ? volumeKey : `${volumeKey}/p${input.partition}`],
        notCancellable: PENDING_ASSIGNMENT,
        params: { host: input.host, ...(input.requestId === undefined ? {} : { requestId: input.requestId }) },
        run: async () => {
          const answer = await this.station.assign(input);
          return { status: answer.status, body: assignmentView(answer.assignment, this.station.store) };
        },
      },
      principal,
    );
  }

  unassign(principal: Principal, id: string): TaskRecord {
    return this.start(
      {
        kind: "assignment.delete",
        target: { type: "assignment", id },
        objects: [`assignment:${id}`],
        notCancellable: "a revoke is recorded first and finished by reconcile if a unit cannot be told now",
        run: async () => {
          const answer = await this.station.unassign(id);
          return answer.status === 204 ? { status: 204 } : { status: 202, body: assignmentView(answer.assignment, this.station.store) };
        },
      },
      principal,
    );
  }

  /**
   * A host's allocation. It holds no object: the volume is chosen inside, and
   * the allocator's own accounting keeps concurrent allocations apart; a retry
   * with the same requestId joins the first (and answers 200).
   */
  allocate(principal: Principal, input: AllocationInput, callerAddress: string): TaskRecord {
    return this.start(
      {
        kind: "allocation",
        target: { type: "host", id: input.host },
        objects: [],
        notCancellable: PENDING_ASSIGNMENT,
        params: { requestId: input.requestId, sizeBytes: input.sizeBytes, copies: input.copies ?? 1 },
        run: async () => {
          const answer = await this.station.allocate(input, callerAddress);
          if (answer.kind === "dry_run") return { status: 200, body: { dryRun: true } };
          return { status: answer.status, body: assignmentView(answer.assignment, this.station.store) };
        },
      },
      principal,
    );
  }
}
