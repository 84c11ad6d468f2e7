// The one error path of the station API: any thrown value (an IpsanError from
// a handler or the station core, ajv's validation errors, fastify's own
// errors) becomes {status, body: {error: {code, message, field?, reasons?}}},
// the status from the error catalogue (src/util/errors.ts).

import { IpsanError, errorMessage } from "../../util/errors.ts";
import { NoSpaceError } from "../station.ts";
import { TaskConflictError } from "../tasks/runner.ts";
import { show } from "../validate.ts";
import { BODY_BYTES_MAX } from "./limits.ts";

export interface ErrorReply {
  readonly status: number;
  readonly body: { error: Record<string, unknown> };
  /** An unexpected error (a bug): logged with its stack. */
  readonly internal: boolean;
}

/** What ajv says of one failed keyword (fastify passes them as error.validation, with verbose: data and parentSchema). */
interface AjvError {
  readonly keyword: string;
  readonly instancePath: string;
  readonly params: Record<string, unknown>;
  readonly message?: string;
  readonly data?: unknown;
  readonly parentSchema?: { properties?: Record<string, unknown> };
}

/** "/legs/0/state" -> "legs[0].state"; the root is the body, the query or the path. */
function fieldOf(path: string, context: string): string {
  let field = "";
  for (const raw of path.split("/").slice(1)) {
    const part = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    field += /^[0-9]+$/.test(part) ? `[${part}]` : field === "" ? part : `.${part}`;
  }
  if (field !== "") return field;
  return context === "querystring" ? "query" : context === "params" ? "path" : context === "headers" ? "header" : "body";
}

const join = (parent: string, child: string, root: boolean): string => (root ? child : `${parent}.${child}`);

/** ajv's errors as one INVALID_ARGUMENT naming the field, with the value shown. */
export function validationError(errors: readonly AjvError[], context: string): IpsanError {
  const last = errors[errors.length - 1];
  if (last === undefined) return new IpsanError("INVALID_ARGUMENT", "invalid request", { field: context });
  if (last.keyword === "anyOf") {
    // A union whose object branch was taken (the value is an object) but failed inside: name that field.
    const inner = errors.find(
      (e) => e.instancePath.startsWith(`${last.instancePath}/`) || (e.instancePath === last.instancePath && (e.keyword === "required" || e.keyword === "additionalProperties")),
    );
    if (inner !== undefined) return validationError([inner], context);
  }
  const base = fieldOf(last.instancePath, context);
  const root = last.instancePath === "";
  if (last.keyword === "required") {
    const field = join(base, String(last.params["missingProperty"]), root);
    return new IpsanError("INVALID_ARGUMENT", `${field}: is required`, { field });
  }
  if (last.keyword === "additionalProperties") {
    const key = String(last.params["additionalProperty"]);
    const field = join(base, key === "" ? '""' : key.slice(0, 60), root);
    const allowed = Object.keys(last.parentSchema?.properties ?? {}).join(", ") || "none";
    const what = context === "querystring" ? "query parameter" : "field";
    return new IpsanError("INVALID_ARGUMENT", `unknown ${what} ${show(key)} (allowed: ${allowed})`, { field });
  }
  let expected = last.message ?? "is invalid";
  if (last.keyword === "anyOf") {
    // A union (e.g. a size: integer or string; an optional field: X or null): name the types it takes.
    const types = errors.filter((e) => e.instancePath === last.instancePath && e.keyword === "type").map((e) => String(e.params["type"]));
    if (types.length > 0) expected = `must be ${[...new Set(types)].join(" or ")}`;
  }
  if (last.keyword === "enum" && Array.isArray(last.params["allowedValues"])) expected = `must be one of ${last.params["allowedValues"].join(", ")}`;
  return new IpsanError("INVALID_ARGUMENT", `${base}: ${expected}, got ${show(last.data)}`, { field: base });
}

export function errorReply(error: unknown): ErrorReply {
  const e = error as { code?: unknown; statusCode?: unknown; validation?: unknown; validationContext?: unknown } | null;
  let mapped: IpsanError | null = null;
  if (error instanceof IpsanError) mapped = error;
  else if (e !== null && typeof e === "object" && Array.isArray(e.validation)) mapped = validationError(e.validation as AjvError[], String(e.validationContext ?? "body"));
  else if (e?.code === "FST_ERR_CTP_BODY_TOO_LARGE") mapped = new IpsanError("TOO_LARGE", `request body over ${BODY_BYTES_MAX} bytes`, { field: "body" });
  else if (e?.code === "FST_ERR_BAD_URL") mapped = new IpsanError("INVALID_ARGUMENT", `bad percent-encoding in the path`, { field: "path" });
  else if (typeof e?.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500) {
    // fastify's own refusals of a malformed request (content length, ...)
    mapped = new IpsanError("INVALID_ARGUMENT", errorMessage(error), { field: String(e.code).startsWith("FST_ERR_CTP") ? "body" : "request" });
  }
  if (mapped === null) {
    return { status: 500, body: { error: { code: "IO_ERROR", message: `internal error: ${errorMessage(error)}` } }, internal: true };
  }
  const body: Record<string, unknown> = { code: mapped.code, message: mapped.message };
  if (mapped.field !== undefined) body["field"] = mapped.field;
  if (mapped instanceof NoSpaceError) body["reasons"] = mapped.reasons;
  // Another task holds the object: its id, so a client can follow it.
  if (mapped instanceof TaskConflictError) body["task"] = mapped.task;
  return { status: mapped.httpStatus, body: { error: body }, internal: false };
}
