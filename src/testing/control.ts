// A small client for the unit's control API (HTTP + JSON with a bearer token),
// for tests that need what the CLI flags cannot do (partitions, grants, grow).

import { fetchText } from "./fetch.ts";
import type { RunningUnit } from "./unit.ts";

export const CONTROL_TIMEOUT_MS = 10_000;

export interface ControlResponse {
  status: number;
  body: unknown;
}

export async function controlRequest(
  unit: RunningUnit,
  method: "GET" | "POST" | "PUT" | "DELETE",
  path: string,
  body?: unknown,
  token: string = unit.controlToken(),
): Promise<ControlResponse> {
  if (unit.controlUrl === undefined) throw new Error("unit was started without --control");
  const init: RequestInit = {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
  };
  if (body !== undefined) init.body = JSON.stringify(body);
  const { response, text } = await fetchText(`${unit.controlUrl}${path}`, init, CONTROL_TIMEOUT_MS);
  let parsed: unknown = text;
  try {
    parsed = text === "" ? undefined : JSON.parse(text);
  } catch {
    // keep the raw text for the assertion message
  }
  return { status: response.status, body: parsed };
}

/** Like controlRequest, but throws unless the status is 2xx. */
export async function controlOk(
  unit: RunningUnit,
  method: "GET" | "POST" | "PUT" | "DELETE",
  path: string,
  body?: unknown,
): Promise<unknown> {
  const response = await controlRequest(unit, method, path, body);
  if (response.status < 200 || response.status > 299) {
    throw new Error(`${method} ${path} -> ${response.status} ${JSON.stringify(response.body)}`);
  }
  return response.body;
}
