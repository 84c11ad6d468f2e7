// ipsan units identity|rotate-secret|forget NAME: unit identities over the
// station's API (issue 7; docs/security.md, "Units"):
//   identity NAME        the unit's enrolled id, secret epoch and state (never the secret)
//   rotate-secret NAME   gives the unit a new secret, sealed under its current one;
//                        the unit switches at its next datagram, without losing any
//   forget NAME          forgets the unit's identity, so a unit whose data dir was lost
//                        (same name, new id) can enrol; until then it is refused

import { UsageError } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { COMMON_FLAGS, COMMON_USAGE, client, name } from "./main.ts";

const USAGE = `usage: ipsan units identity NAME [--json]
       ipsan units rotate-secret NAME [--json]
       ipsan units forget NAME [--json]
`;

export async function unitIdentityMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(`${USAGE}${COMMON_USAGE}`);
    return 0;
  }
  const [action, unitArg, ...rest] = positionals;
  if (rest.length > 0) throw new UsageError(`unexpected argument "${rest[0]}"\n${USAGE.trimEnd()}`);
  const unit = name(unitArg, "unit NAME");
  const path = `/api/v1/units/${encodeURIComponent(unit)}`;
  const api = await client(values);
  let body: unknown;
  switch (action) {
    case "identity":
      body = await api.call("GET", `${path}/identity`);
      break;
    case "rotate-secret":
      body = await api.call("POST", `${path}/rotate-secret`, {});
      break;
    case "forget":
      body = await api.call("DELETE", `${path}/identity`);
      break;
    default:
      throw new UsageError(`unknown action "${action}" (identity, rotate-secret, forget)\n${USAGE.trimEnd()}`);
  }
  if (values.json === true) {
    process.stdout.write(`${JSON.stringify(body, null, 2)}\n`);
    return 0;
  }
  const b = body as Record<string, unknown>;
  if (action === "forget") process.stdout.write(`unit ${unit}: identity ${String(b["unitId"])} forgotten; the next unit named ${unit} enrols afresh\n`);
  else process.stdout.write(`unit ${unit}: id ${String(b["unitId"])} epoch ${String(b["epoch"])} ${String(b["state"])}\n`);
  return 0;
}
