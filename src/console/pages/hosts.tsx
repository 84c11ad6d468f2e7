// Hosts: every registered host with its address, state, spare flag, iSCSI
// initiator name and when it was last heard from; live from the event stream.

import type { JSX } from "preact";
import { type Model, useModel } from "../model.ts";
import { StateWord, formatTime } from "../ui.tsx";

export function HostsPage({ model }: { model: Model }): JSX.Element {
  const s = useModel(model);
  return (
    <section aria-labelledby="hosts-h">
      <h1 id="hosts-h">Hosts</h1>
      {s.hosts.length === 0 ? <p>No host has registered yet (ipsan host register, or an allocation names one).</p> : null}
      <div class="table-wrap">
        <table class="grid" aria-label="Hosts">
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">State</th>
              <th scope="col">Address</th>
              <th scope="col">Spare</th>
              <th scope="col">iSCSI initiator</th>
              <th scope="col">Last seen</th>
            </tr>
          </thead>
          <tbody>
            {s.hosts.map((h) => (
              <tr key={h.name}>
                <th scope="row">{h.name}</th>
                <td>
                  <StateWord state={h.state} />
                </td>
                <td>{h.address}</td>
                <td>{h.spare === true ? "spare" : "-"}</td>
                <td>{h.iqn ?? "-"}</td>
                <td>{formatTime(h.lastSeenAt)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </section>
  );
}
