// ipsan command-line entry: dispatches to subcommands. Every subcommand parses
// its own flags with src/util/flags.ts and throws UsageError on bad input.

import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { CONFIG_ENV } from "./util/config.ts";
import { UsageError, errorMessage } from "./util/errors.ts";
import { LOG_FORMATS, setLogFormat, type LogFormat } from "./util/log.ts";
import { HelpRequested, describeFlags, wantsHelp } from "./util/flags.ts";

type Command = (argv: readonly string[]) => Promise<number | void>;

const COMMANDS: Readonly<Record<string, () => Promise<Command>>> = {
  unit: async () => (await import("./unit/main.ts")).unitMain,
  host: async () => (await import("./host/main.ts")).hostMain,
  demo: async () => (await import("./demo/main.ts")).demoMain,
  station: async () => (await import("./station/main.ts")).stationMain,
  units: async () => (await import("./admin/main.ts")).unitsMain,
  volumes: async () => (await import("./admin/main.ts")).volumesMain,
  hosts: async () => (await import("./admin/main.ts")).hostsMain,
  assignments: async () => (await import("./admin/main.ts")).assignmentsMain,
  volume: async () => (await import("./admin/main.ts")).volumeMain,
  assign: async () => (await import("./admin/main.ts")).assignMain,
  unassign: async () => (await import("./admin/main.ts")).unassignMain,
  tokens: async () => (await import("./admin/main.ts")).tokensMain,
  audit: async () => (await import("./admin/main.ts")).auditMain,
  tasks: async () => (await import("./admin/tasks.ts")).tasksMain,
  completion: async () => async (argv) => (await import("./admin/completion.ts")).completionMain(argv, Object.keys(COMMANDS)),
};

/** Each command's own usage text, where it has one (the rest are described by the lines of USAGE that name them). */
const COMMAND_USAGE: Readonly<Record<string, () => Promise<string>>> = {
  unit: async () => (await import("./unit/main.ts")).USAGE,
  host: async () => (await import("./host/main.ts")).USAGE,
  station: async () => (await import("./station/main.ts")).USAGE,
  demo: async () => (await import("./demo/main.ts")).USAGE,
};
const UNIT_VOLUME_USAGE = async (): Promise<string> => (await import("./unit/admin.ts")).USAGE;

const USAGE = `usage: ipsan COMMAND [flags]

commands:
  unit      run a SAN unit: carve storage into volumes and serve them over NBD (and iSCSI: --iscsi)
  host      the host side: request, attach, detach, release a volume; agent
  demo      a whole SAN on loopback: a station and N units (Ctrl-C stops it)
  station   run the control station: the pool of units, allocation, REST API
  help      show this text
  completion bash|zsh  shell completion: source <(ipsan completion bash)

global flags (any command): --log-format text|json (or $IPSAN_LOG_FORMAT): log lines as text or JSON;
  --config FILE (or $IPSAN_CONFIG): station, token-file, ca-file, state-dir, host as "key = value" lines
  (default ~/.config/ipsan/config, then /etc/ipsan/ipsan.conf; a flag or an environment variable wins);
  --version: print the version

admin (over the station's API; --station URL --token-file FILE, or $IPSAN_STATION $IPSAN_TOKEN_FILE, or the config file):
  units | volumes | hosts | assignments [--json]     list the pool
  units identity|rotate-secret|forget NAME          a unit's enrolled identity, rotate its secret, forget it
  volume create|delete|grow|partition UNIT NAME ...  change a unit's volumes
  volume wipe UNIT NAME                             zero a volume (a task; progress on a TTY)
  tasks [--state S] | tasks show|cancel|wait ID     the station's tasks: state, progress, cancel, follow to the end
  assign HOST UNIT VOLUME [--partition N]           give a host a volume (or partition)
  unassign ID                                       take it back (the unit revokes the grant)
  tokens create|list|revoke                          API tokens with a role (admin, operator, viewer)
  hosts register NAME --address IP [--spare]        record a host (or change its address) with an admin token
  hosts token create [--host NAME] [--expires D]     a one-time join token for "ipsan host register"
  hosts rotate-key NAME                             new NBD keys (TLS-PSK) for that host on every unit
  audit verify [--file PATH] | audit list            check or read the station's audit log
  (every admin command also takes --ca-file FILE or $IPSAN_CA_FILE for an https:// station)
`;

/** The package's version, from its package.json (one directory above src/ and dist/). */
export function packageVersion(): string {
  const text = readFileSync(new URL("../package.json", import.meta.url), "utf8");
  return (JSON.parse(text) as { version: string }).version;
}

/**
 * Takes the global flags out of argv (they may stand anywhere) and applies
 * them, for this process and, through the environment, the processes it
 * starts: --log-format text|json and --config FILE (src/util/config.ts).
 */
function takeGlobalFlags(argv: readonly string[]): string[] {
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    const flag = ["--log-format", "--config"].find((name) => arg === name || arg.startsWith(`${name}=`));
    if (flag === undefined) {
      rest.push(arg);
      continue;
    }
    const value = arg === flag ? (argv[++i] ?? "") : arg.slice(flag.length + 1);
    if (flag === "--config") {
      if (value === "") throw new UsageError("--config: expected a file");
      process.env[CONFIG_ENV] = resolve(value);
      continue;
    }
    if (!(LOG_FORMATS as readonly string[]).includes(value)) throw new UsageError(`--log-format: expected ${LOG_FORMATS.join(" or ")}, got "${value}"`);
    setLogFormat(value as LogFormat);
    process.env["IPSAN_LOG_FORMAT"] = value;
  }
  return rest;
}

export async function main(argv: readonly string[]): Promise<number> {
  let args: string[];
  try {
    args = takeGlobalFlags(argv);
  } catch (error) {
    process.stderr.write(`ipsan: ${errorMessage(error)}\n`);
    return 2;
  }
  if (args[0] === "--version" || args[0] === "version") {
    process.stdout.write(`ipsan ${packageVersion()}\n`);
    return 0;
  }
  const [name, ...rest] = args;
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    process.stdout.write(USAGE);
    return name === undefined ? 2 : 0;
  }
  const load = COMMANDS[name];
  if (load === undefined) {
    process.stderr.write(`ipsan: unknown command "${name}"\n${USAGE}`);
    return 2;
  }
  try {
    const result = await (await load())(rest);
    return typeof result === "number" ? result : 0;
  } catch (error) {
    // --help anywhere: the command's usage on stdout, exit 0, even where the command checked its arguments first.
    if (error instanceof HelpRequested || (error instanceof UsageError && wantsHelp(rest))) {
      process.stdout.write(await helpText(name, rest, error instanceof HelpRequested ? error : undefined));
      return 0;
    }
    if (error instanceof UsageError) {
      process.stderr.write(`ipsan ${name}: ${error.message}\n`);
      return 2;
    }
    process.stderr.write(`ipsan ${name}: ${errorMessage(error)}\n`);
    if (process.env["IPSAN_DEBUG"]) process.stderr.write(`${(error as Error).stack ?? ""}\n`);
    return 1;
  }
}

/** The usage of `ipsan NAME SUB...`: the command's usage lines for that subcommand, then its flags. */
async function helpText(name: string, rest: readonly string[], help: HelpRequested | undefined): Promise<string> {
  const words = [name];
  for (const arg of rest) {
    if (arg.startsWith("-")) break;
    words.push(arg);
  }
  let usage = name === "unit" && words[1] === "volume" ? await UNIT_VOLUME_USAGE() : ((await COMMAND_USAGE[name]?.()) ?? "");
  if (usage === "") usage = USAGE.split("\n").filter((line) => line.trimStart().split(/\s+/)[0]?.split("|").includes(name)).join("\n");
  const sub = words[words.length - 1];
  if (words.length > 1 && sub !== undefined) {
    // Only the lines about this subcommand (and their indented continuations), when the usage has them.
    const lines = usage.split("\n");
    const picked: string[] = [];
    let inside = false;
    for (const line of lines) {
      const first = line.trimStart().split(/\s+/)[0] ?? "";
      const starts = first.split("|").includes(sub) && /^\s{0,4}\S/.test(line);
      if (starts) inside = true;
      else if (inside && !/^\s{6,}/.test(line)) inside = false;
      if (inside) picked.push(line);
    }
    if (picked.length > 0) usage = picked.join("\n");
  }
  const flags = help === undefined ? "" : `\nflags:\n${describeFlags(help.flags, help.notes)}\n`;
  const header = usage.startsWith("usage:") ? "" : `usage: ipsan ${words.join(" ")} [flags]\n`;
  return `${header}${usage.trimEnd()}\n${flags}`;
}
