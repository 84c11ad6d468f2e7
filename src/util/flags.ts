// Flag parsing for subcommands on top of node:util parseArgs, turning its
// errors into UsageError so the CLI prints them without a stack trace.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError, errorMessage } from "./errors.ts";

export type FlagSpec = NonNullable<ParseArgsConfig["options"]>;

/**
 * `--help` or `-h` among a command's flags: the CLI answers with the command's
 * usage and its flags on stdout, exit 0 (src/cli.ts), whatever else was given.
 */
export class HelpRequested extends Error {
  readonly flags: FlagSpec;
  /** A note after a flag's line, by flag name (e.g. an old spelling: "old spelling of --discovery"). */
  readonly notes: Readonly<Record<string, string>>;
  constructor(flags: FlagSpec, notes: Readonly<Record<string, string>> = {}) {
    super("help requested");
    this.name = "HelpRequested";
    this.flags = flags;
    this.notes = notes;
  }
}

/** True if argv asks for help (before a "--" that ends the flags). */
export function wantsHelp(argv: readonly string[]): boolean {
  for (const arg of argv) {
    if (arg === "--") return false;
    if (arg === "--help" || arg === "-h") return true;
  }
  return false;
}

/** "  --name VALUE" / "  --flag" lines for a usage text. */
export function describeFlags(flags: FlagSpec, notes: Readonly<Record<string, string>> = {}): string {
  const lines = Object.entries(flags)
    .filter(([name]) => name !== "help")
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, spec]) => `  --${name}${spec.type === "string" ? " VALUE" : ""}${spec.multiple === true ? " (repeatable)" : ""}${notes[name] === undefined ? "" : `   (${notes[name]})`}`);
  return [...lines, "  -h, --help   this text"].join("\n");
}

export function parseFlags<T extends FlagSpec>(argv: readonly string[], options: T, allowPositionals = false, notes: Readonly<Record<string, string>> = {}) {
  if (wantsHelp(argv)) throw new HelpRequested(options, notes);
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
