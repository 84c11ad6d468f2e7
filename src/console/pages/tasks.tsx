// Tasks: the station's tasks (GET /api/v1/tasks, issue 8), newest first, live
// from "task" events: kind, target, state word, a progress bar (role
// progressbar, aria-valuenow in percent), who started it, and Cancel where the
// station says it is cancellable.

import type { JSX } from "preact";
import { useState } from "preact/hooks";
import { runAction } from "../actions.ts";
import { type Model, useModel } from "../model.ts";
import { TASK_STATES, type Task } from "../types.ts";
import { ActionButton, StateWord, Status, formatBytes, formatTime, ProgressBar } from "../ui.tsx";

export const TASKS_SHOWN = 200;

function progressText(task: Task): string {
  const p = task.progress;
  if (p === null) return task.state === "succeeded" ? "done" : task.state;
  const percent = p.total > 0 ? Math.round((p.done / p.total) * 100) : 0;
  return p.unit === "bytes" ? `${formatBytes(p.done)} of ${formatBytes(p.total)} (${percent}%)` : `${p.done} of ${p.total} steps (${percent}%)`;
}

export function TasksPage({ model, denied }: { model: Model; denied: string | null }): JSX.Element {
  const s = useModel(model);
  const [stateFilter, setStateFilter] = useState("");
  const [message, setMessage] = useState<{ kind: "ok" | "error"; text: string } | null>(null);
  if (s.tasksAvailable === false) {
    return (
      <section aria-labelledby="tasks-h">
        <h1 id="tasks-h">Tasks</h1>
        <p>This station has no task list (GET /api/v1/tasks answered 404): its changes run synchronously.</p>
      </section>
    );
  }
  const tasks = [...s.tasks.values()]
    .filter((t) => stateFilter === "" || t.state === stateFilter)
    .sort((a, b) => b.createdAt.localeCompare(a.createdAt))
    .slice(0, TASKS_SHOWN);
  return (
    <section aria-labelledby="tasks-h">
      <h1 id="tasks-h">Tasks</h1>
      <div class="toolbar">
        <label for="task-state">Show state</label>
        <select id="task-state" value={stateFilter} onChange={(e) => setStateFilter(e.currentTarget.value)}>
          <option value="">all</option>
          {TASK_STATES.map((st) => (
            <option key={st} value={st}>
              {st}
            </option>
          ))}
        </select>
      </div>
      <Status message={message} />
      <div class="table-wrap">
        <table class="grid" aria-label="Tasks">
          <thead>
            <tr>
              <th scope="col">Kind</th>
              <th scope="col">Target</th>
              <th scope="col">State</th>
              <th scope="col">Progress</th>
              <th scope="col">Started by</th>
              <th scope="col">Created</th>
              <th scope="col">Message</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {tasks.map((t) => (
              <tr key={t.id} data-task={t.id}>
                <th scope="row" title={t.id}>
                  {t.kind}
                </th>
                <td>{t.target === null ? "-" : `${t.target.type} ${t.target.id}`}</td>
                <td>
                  <StateWord state={t.state} />
                </td>
                <td>
                  <ProgressBar
                    label={`Progress of ${t.kind} ${t.target?.id ?? t.id}`}
                    done={t.progress?.done ?? (t.state === "succeeded" ? 1 : 0)}
                    total={t.progress?.total ?? 1}
                    text={progressText(t)}
                  />
                </td>
                <td>{t.startedBy}</td>
                <td>{formatTime(t.createdAt)}</td>
                <td class="msg">{t.error?.message ?? t.message ?? ""}</td>
                <td>
                  {t.cancellable && (t.state === "queued" || t.state === "running") ? (
                    <ActionButton
                      denied={denied}
                      kind="danger"
                      label={`Cancel ${t.kind} ${t.target?.id ?? t.id}`}
                      onClick={() => void runAction(model, `Cancel ${t.id}`, "POST", `/api/v1/tasks/${encodeURIComponent(t.id)}/cancel`, {}).then(setMessage)}
                    >
                      Cancel
                    </ActionButton>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {tasks.length === 0 ? <p>No tasks yet.</p> : null}
    </section>
  );
}
