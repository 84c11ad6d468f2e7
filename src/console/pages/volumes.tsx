// Volumes: one page of the station's volume list at a time (server paging, so
// 10,000 volumes cost one small read), with unit, size, extents, partitions,
// legs of mirrors, assigned host and grants; and the actions: "Create volume"
// (form fields "Unit", "Name", "Size", button "Create"), delete, grow,
// partition/repartition, wipe, assign/unassign, and allocate for a host.

import type { JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { call, describeError, seg } from "../api.ts";
import { type ActionOutcome, newRequestId, runAction } from "../actions.ts";
import { type Model, useModel } from "../model.ts";
import type { Assignment, Page, Task, Volume } from "../types.ts";
import { ActionButton, Pager, Status, formatBytes } from "../ui.tsx";

export const VOLUMES_PAGE_SIZE = 100;
type Message = { kind: "ok" | "error" | "info"; text: string; taskId?: string } | null;
type Panel = { kind: "create" } | { kind: "allocate" } | { kind: "grow" | "partition" | "assign" | "delete" | "wipe" | "assignments"; volume: Volume } | null;

function Field(props: { id: string; label: string; value: string; onInput: (v: string) => void; hint?: string; list?: string; required?: boolean; placeholder?: string }): JSX.Element {
  return (
    <div class="field">
      <label for={props.id}>{props.label}</label>
      <input
        id={props.id}
        value={props.value}
        list={props.list}
        required={props.required ?? true}
        placeholder={props.placeholder}
        aria-describedby={props.hint === undefined ? undefined : `${props.id}-hint`}
        onInput={(e) => props.onInput(e.currentTarget.value)}
      />
      {props.hint === undefined ? null : (
        <span class="hint" id={`${props.id}-hint`}>
          {props.hint}
        </span>
      )}
    </div>
  );
}

/** An action's message, with its task's state now (the task's events keep it current). */
function withTaskState(message: Message, task: Task | undefined): Message {
  if (message === null || task === undefined) return message;
  const failed = task.state === "failed" || task.state === "cancelled";
  const detail = task.error?.message ?? task.message;
  return { kind: failed ? "error" : "ok", text: `${message.text.replace(/ (queued|running|succeeded|failed|cancelled)$/, "")} ${task.state}${detail === null || detail === undefined ? "" : `: ${detail}`}` };
}

/** "64M, 32M" -> ["64M", "32M"]; "none" or "" -> []. Numbers stay numbers (bytes). */
function parseSizes(text: string): (string | number)[] {
  const t = text.trim();
  if (t === "" || t.toLowerCase() === "none") return [];
  return t.split(/[\s,]+/).filter((x) => x !== "").map((x) => (/^[0-9]+$/.test(x) ? Number(x) : x));
}
function sizeValue(text: string): string | number {
  const t = text.trim();
  return /^[0-9]+$/.test(t) ? Number(t) : t;
}

function Form(props: { title: string; submit: string; onSubmit: () => Promise<void>; onCancel: () => void; denied: string | null; children: JSX.Element | JSX.Element[] }): JSX.Element {
  const [busy, setBusy] = useState(false);
  const ref = useRef<HTMLFormElement>(null);
  // Keyboard users land in the form's first field (or its first button) when it opens.
  useEffect(() => ref.current?.querySelector<HTMLElement>("input, select, button")?.focus(), []);
  return (
    <form
      ref={ref}
      class="panel"
      aria-label={props.title}
      onSubmit={(e) => {
        e.preventDefault();
        if (busy || props.denied !== null) return;
        setBusy(true);
        void props.onSubmit().finally(() => setBusy(false));
      }}
      onKeyDown={(e) => {
        if (e.key === "Escape") props.onCancel();
      }}
    >
      <h2>{props.title}</h2>
      {props.children}
      <div class="buttons">
        <ActionButton type="submit" kind="primary" denied={props.denied} busy={busy} onClick={() => undefined}>
          {props.submit}
        </ActionButton>
        <button type="button" class="btn" onClick={props.onCancel}>
          Cancel
        </button>
      </div>
    </form>
  );
}

export function VolumesPage({ model, denied }: { model: Model; denied: string | null }): JSX.Element {
  const s = useModel(model);
  const [unitFilter, setUnitFilter] = useState("");
  const [offset, setOffset] = useState(0);
  const [page, setPage] = useState<Page<Volume> | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [panel, setPanel] = useState<Panel>(null);
  const [message, setMessage] = useState<Message>(null);
  const [reload, setReload] = useState(0);
  const filter = unitFilter.trim();
  useEffect(() => {
    const query = new URLSearchParams({ offset: String(offset), limit: String(VOLUMES_PAGE_SIZE) });
    if (filter !== "" && s.units.has(filter)) query.set("unit", filter);
    const controller = new AbortController();
    call<Page<Volume>>("GET", `/api/v1/volumes?${query}`, { signal: controller.signal })
      .then((a) => {
        setPage(a.body);
        setLoadError(null);
      })
      .catch((e: unknown) => !controller.signal.aborted && setLoadError(describeError(e)));
    return () => controller.abort();
  }, [offset, filter, s.volumesVersion, reload, s.units.has(filter)]);

  const done = (outcome: ActionOutcome): void => {
    setMessage(outcome.task === null ? { kind: outcome.kind, text: outcome.text } : { kind: outcome.kind, text: outcome.text, taskId: outcome.task.id });
    if (outcome.kind === "ok") {
      setPanel(null);
      setReload((n) => n + 1);
    }
  };
  const act = async (what: string, method: string, path: string, body?: unknown): Promise<void> => {
    setMessage({ kind: "info", text: `${what}…` });
    done(await runAction(model, what, method, path, body));
  };

  return (
    <section aria-labelledby="volumes-h">
      <h1 id="volumes-h">Volumes</h1>
      <div class="toolbar">
        <ActionButton kind="primary" denied={denied} onClick={() => setPanel({ kind: "create" })}>
          Create volume
        </ActionButton>
        <ActionButton denied={denied} onClick={() => setPanel({ kind: "allocate" })}>
          Allocate for a host
        </ActionButton>
        <label for="volume-unit-filter">Show unit</label>
        <input
          id="volume-unit-filter"
          type="search"
          list="unit-names"
          placeholder="all units"
          value={unitFilter}
          onInput={(e) => {
            setUnitFilter(e.currentTarget.value);
            setOffset(0);
          }}
        />
      </div>
      <datalist id="unit-names">
        {[...s.units.keys()].slice(0, 2000).map((n) => (
          <option key={n} value={n} />
        ))}
      </datalist>
      <datalist id="host-names">
        {s.hosts.map((h) => (
          <option key={h.name} value={h.name} />
        ))}
      </datalist>
      <Status message={withTaskState(message, message?.taskId === undefined ? undefined : s.tasks.get(message.taskId))} />
      {panel === null ? null : <ActionPanel key={"volume" in panel ? `${panel.kind}:${panel.volume.id}` : panel.kind} panel={panel} denied={denied} onCancel={() => setPanel(null)} act={act} />}
      {loadError === null ? null : (
        <p class="status status-error" role="alert">
          {loadError}
        </p>
      )}
      <div class="table-wrap">
        <table class="grid" aria-label="Volumes">
          <thead>
            <tr>
              <th scope="col">Volume</th>
              <th scope="col">Unit</th>
              <th scope="col" class="num">Size</th>
              <th scope="col">Extents</th>
              <th scope="col">Partitions</th>
              <th scope="col">Assigned to</th>
              <th scope="col">Grants</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {(page?.items ?? []).map((v) => (
              <tr key={v.id} data-volume={v.id}>
                <th scope="row">{v.name}</th>
                <td>{v.unit}</td>
                <td class="num">{formatBytes(v.sizeBytes)}</td>
                <td>
                  {v.extents.length === 1 ? `LBA ${v.extents[0]?.startLba}–${v.extents[0]?.endLba}` : `${v.extents.length} extents`}
                </td>
                <td>{v.partitions.length === 0 ? "-" : v.partitions.map((p) => `p${p.index} ${formatBytes(p.sizeBytes)}`).join(", ")}</td>
                <td>{v.assignedTo ?? "-"}</td>
                <td>{v.grants.length === 0 ? "-" : v.grants.join(", ")}</td>
                <td>
                  <div class="actions">
                  <ActionButton denied={denied} label={`Grow ${v.id}`} onClick={() => setPanel({ kind: "grow", volume: v })}>
                    Grow
                  </ActionButton>
                  <ActionButton denied={denied} label={`Partition ${v.id}`} onClick={() => setPanel({ kind: "partition", volume: v })}>
                    Partition
                  </ActionButton>
                  <ActionButton denied={denied} label={`Assign ${v.id}`} onClick={() => setPanel({ kind: "assign", volume: v })}>
                    Assign
                  </ActionButton>
                  <button type="button" class="btn" aria-label={`Assignments of ${v.id}`} onClick={() => setPanel({ kind: "assignments", volume: v })}>
                    Assignments
                  </button>
                  <ActionButton denied={denied} kind="danger" label={`Wipe ${v.id}`} onClick={() => setPanel({ kind: "wipe", volume: v })}>
                    Wipe
                  </ActionButton>
                  <ActionButton denied={denied} kind="danger" label={`Delete ${v.id}`} onClick={() => setPanel({ kind: "delete", volume: v })}>
                    Delete
                  </ActionButton>
                  </div>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <Pager offset={offset} pageSize={VOLUMES_PAGE_SIZE} total={page?.total ?? 0} onOffset={setOffset} what="volumes" />
    </section>
  );
}

function ActionPanel(props: {
  panel: NonNullable<Panel>;
  denied: string | null;
  onCancel: () => void;
  act: (what: string, method: string, path: string, body?: unknown) => Promise<void>;
}): JSX.Element {
  const { panel, denied, onCancel, act } = props;
  const [a, setA] = useState("");
  const [b, setB] = useState("");
  const [c, setC] = useState("");
  const [copies, setCopies] = useState("1");
  switch (panel.kind) {
    case "create":
      return (
        <Form title="Create a volume" submit="Create" denied={denied} onCancel={onCancel} onSubmit={() => act(`Create ${a}/${b}`, "POST", "/api/v1/volumes", { unit: a.trim(), name: b.trim(), sizeBytes: sizeValue(c) })}>
          <Field id="new-unit" label="Unit" value={a} onInput={setA} list="unit-names" />
          <Field id="new-name" label="Name" value={b} onInput={setB} hint="letters, digits, _ . - (up to 63)" />
          <Field id="new-size" label="Size" value={c} onInput={setC} hint="bytes, or with K, M, G or T: 64M" />
        </Form>
      );
    case "allocate":
      return (
        <Form
          title="Allocate for a host"
          submit="Allocate"
          denied={denied}
          onCancel={onCancel}
          onSubmit={() => act(`Allocate ${b} for ${a}`, "POST", "/api/v1/allocations", { requestId: newRequestId(), host: a.trim(), sizeBytes: sizeValue(b), copies: Number(copies) })}
        >
          <Field id="alloc-host" label="Host" value={a} onInput={setA} list="host-names" />
          <Field id="alloc-size" label="Size" value={b} onInput={setB} hint="bytes, or with K, M, G or T: 1G" />
          <div class="field">
            <label for="alloc-copies">Copies</label>
            <select id="alloc-copies" value={copies} onChange={(e) => setCopies(e.currentTarget.value)}>
              <option value="1">1 (one volume)</option>
              <option value="2">2 (mirror)</option>
              <option value="3">3 (mirror)</option>
            </select>
          </div>
        </Form>
      );
    case "grow":
      return (
        <Form title={`Grow ${panel.volume.id}`} submit="Grow" denied={denied} onCancel={onCancel} onSubmit={() => act(`Grow ${panel.volume.id}`, "POST", `/api/v1/volumes${seg(panel.volume.unit, panel.volume.name)}/grow`, { sizeBytes: sizeValue(a) })}>
          <Field id="grow-size" label="New size" value={a} onInput={setA} hint={`the new total; now ${formatBytes(panel.volume.sizeBytes)}`} />
        </Form>
      );
    case "partition":
      return (
        <Form
          title={`Partition ${panel.volume.id}`}
          submit="Partition"
          denied={denied}
          onCancel={onCancel}
          onSubmit={() => act(`Partition ${panel.volume.id}`, "PUT", `/api/v1/volumes${seg(panel.volume.unit, panel.volume.name)}/partitions`, { sizesBytes: parseSizes(a) })}
        >
          <Field id="part-sizes" label="Partition sizes" value={a} onInput={setA} required={false} hint={`comma-separated, e.g. 16M, 16M; "none" removes them (volume ${formatBytes(panel.volume.sizeBytes)})`} />
        </Form>
      );
    case "assign":
      return (
        <Form
          title={`Assign ${panel.volume.id} to a host`}
          submit="Assign"
          denied={denied}
          onCancel={onCancel}
          onSubmit={() =>
            act(`Assign ${panel.volume.id}${b.trim() === "" ? "" : ` partition ${b.trim()}`} to ${a}`, "POST", "/api/v1/assignments", {
              host: a.trim(),
              unit: panel.volume.unit,
              volume: panel.volume.name,
              ...(b.trim() === "" ? {} : { partition: Number(b.trim()) }),
              ...(c.trim() === "" ? {} : { requestId: c.trim() }),
            })
          }
        >
          <Field id="assign-host" label="Host" value={a} onInput={setA} list="host-names" />
          <Field id="assign-partition" label="Partition" value={b} onInput={setB} required={false} hint={`blank: the whole volume; else 1..${panel.volume.partitions.length}`} />
        </Form>
      );
    case "delete":
      return (
        <Form title={`Delete ${panel.volume.id}?`} submit="Delete" denied={denied} onCancel={onCancel} onSubmit={() => act(`Delete ${panel.volume.id}`, "DELETE", `/api/v1/volumes${seg(panel.volume.unit, panel.volume.name)}`)}>
          <p>Its data is gone for good. A volume that is assigned is refused.</p>
        </Form>
      );
    case "wipe":
      return (
        <Form title={`Wipe ${panel.volume.id}?`} submit="Wipe" denied={denied} onCancel={onCancel} onSubmit={() => act(`Wipe ${panel.volume.id}`, "POST", `/api/v1/volumes${seg(panel.volume.unit, panel.volume.name)}/wipe`, {})}>
          <p>Every byte of the volume becomes zero, in chunks (a task with progress on the Tasks page). Cancelling it leaves the volume partly zeroed. A granted volume is refused.</p>
        </Form>
      );
    case "assignments":
      return <Assignments volume={panel.volume} denied={denied} onCancel={onCancel} act={act} />;
  }
}

/** The live assignments of one volume (whole or by partition, every leg of a mirror), each with Unassign. */
function Assignments(props: { volume: Volume; denied: string | null; onCancel: () => void; act: (what: string, method: string, path: string) => Promise<void> }): JSX.Element {
  const { volume } = props;
  const [items, setItems] = useState<readonly Assignment[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    call<Page<Assignment>>("GET", "/api/v1/assignments?limit=100000")
      .then((a) => setItems(a.body.items.filter((x) => (x.unit === volume.unit && x.volume === volume.name) || x.legs.some((l) => l.unit === volume.unit && l.volume === volume.name))))
      .catch((e: unknown) => setError(describeError(e)));
  }, [volume.id]);
  return (
    <section class="panel" aria-label={`Assignments of ${volume.id}`}>
      <h2>Assignments of {volume.id}</h2>
      {error === null ? null : <p role="alert">{error}</p>}
      {items === null ? <p role="status">Loading…</p> : items.length === 0 ? <p>Not assigned.</p> : null}
      <ul class="plain">
        {(items ?? []).map((x) => (
          <li key={x.id}>
            {x.id}: {x.partition === null ? "whole volume" : `partition ${x.partition}`} to {x.host}, {x.state}
            {x.copies > 1 ? `, mirror of ${x.copies}: ${x.legs.map((l) => `${l.unit}:${l.state}`).join(" ")}` : ""}{" "}
            <ActionButton denied={props.denied} kind="danger" label={`Unassign ${x.id}`} onClick={() => void props.act(`Unassign ${x.id}`, "DELETE", `/api/v1/assignments${seg(x.id)}`)}>
              Unassign
            </ActionButton>
          </li>
        ))}
      </ul>
      <button type="button" class="btn" onClick={props.onCancel}>
        Close
      </button>
    </section>
  );
}
