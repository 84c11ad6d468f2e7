// Flag parsing for subcommands on top of node:util parseArgs, turning its
// errors into UsageError so the CLI prints them without a stack trace.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError, errorMessage } from "./errors.ts";

export type FlagSpec = NonNullable<ParseArgsConfig["options"]>;

export function parseFlags<T extends FlagSpec>(argv: readonly string[], options: T, allowPositionals = false) {
  try {
    return parseArgs({ args: [...argv], options, strict: true, allowPositionals });
  } catch (error) {
    throw new UsageError(errorMessage(error).replace(/^TypeError \[[A-Z_]+\]: /, ""));
  }
}

/** Splits "HOST:PORT" ("[::1]:10809", "127.0.0.1:0", "name.example:10809"). */
export function parseHostPort(text: string, field: string): { host: string; port: number } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+)):([0-9]{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  if (match === null || !(port >= 0 && port <= 65535)) {
    throw new UsageError(`${field}: invalid address "${text}" (expected HOST:PORT, e.g. 127.0.0.1:0)`);
  }
  return { host: match[1] ?? match[2] ?? "", port };
}
