// Events: the station's event stream as it arrives (the newest first, the
// last 500 kept), filterable by type and by text.

import type { JSX } from "preact";
import { useState } from "preact/hooks";
import { EVENTS_KEPT, type Model, useModel } from "../model.ts";
import { formatTime } from "../ui.tsx";

const TYPES = ["unit", "volumes", "host", "assignment", "task"];

function summary(data: Record<string, unknown>): string {
  const text = JSON.stringify(data);
  return text.length > 160 ? `${text.slice(0, 157)}…` : text;
}

export function EventsPage({ model }: { model: Model }): JSX.Element {
  const s = useModel(model);
  const [type, setType] = useState("");
  const [text, setText] = useState("");
  const needle = text.trim().toLowerCase();
  const shown = s.events.filter((e) => (type === "" || e.type === type) && (needle === "" || `${e.action} ${e.subject} ${JSON.stringify(e.data)}`.toLowerCase().includes(needle)));
  return (
    <section aria-labelledby="events-h">
      <h1 id="events-h">Events</h1>
      <div class="toolbar">
        <label for="event-type">Type</label>
        <select id="event-type" value={type} onChange={(e) => setType(e.currentTarget.value)}>
          <option value="">all</option>
          {TYPES.map((t) => (
            <option key={t} value={t}>
              {t}
            </option>
          ))}
        </select>
        <label for="event-text">Contains</label>
        <input id="event-text" type="search" value={text} onInput={(e) => setText(e.currentTarget.value)} />
      </div>
      <p class="hint">
        Live since this page was opened (the last {EVENTS_KEPT} kept); stream {s.stream.state}.
      </p>
      <div class="table-wrap">
        <table class="grid" aria-label="Events">
          <thead>
            <tr>
              <th scope="col" class="num">#</th>
              <th scope="col">Time</th>
              <th scope="col">Type</th>
              <th scope="col">Action</th>
              <th scope="col">Subject</th>
              <th scope="col">Data</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((e) => (
              <tr key={e.seq}>
                <td class="num">{e.seq}</td>
                <td>{formatTime(e.at)}</td>
                <td>{e.type}</td>
                <td>{e.action}</td>
                <td>{e.subject}</td>
                <td class="data">{summary(e.data)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {shown.length === 0 ? <p>No events yet.</p> : null}
    </section>
  );
}
