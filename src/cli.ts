// ipsan command-line entry: dispatches to subcommands. Every subcommand parses
// its own flags with src/util/flags.ts and throws UsageError on bad input.

import { UsageError, errorMessage } from "./util/errors.ts";

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
};

const USAGE = `usage: ipsan COMMAND [flags]

commands:
  unit      run a SAN unit: carve storage into volumes and serve them over NBD
  host      the host side: request, attach, detach, release a volume; agent
  demo      a whole SAN on loopback: a station and N units (Ctrl-C stops it)
  station   run the control station: the pool of units, allocation, REST API
  help      show this text

admin (over the station's API; --station URL --token-file FILE, or $IPSAN_STATION $IPSAN_TOKEN_FILE):
  units | volumes | hosts | assignments [--json]     list the pool
  units identity|rotate-secret|forget NAME          a unit's enrolled identity, rotate its secret, forget it
  volume create|delete|grow|partition UNIT NAME ...  change a unit's volumes
  volume wipe UNIT NAME                             zero a volume (a task; progress on a TTY)
  tasks [--state S] | tasks show|cancel ID          the station's tasks: state, progress, cancel
  assign HOST UNIT VOLUME [--partition N]           give a host a volume (or partition)
  unassign ID                                       take it back (the unit revokes the grant)
  tokens create|list|revoke                          API tokens with a role (admin, operator, viewer)
  hosts token create [--host NAME] [--expires D]     a one-time join token for "ipsan host register"
  hosts rotate-key NAME                             new NBD keys (TLS-PSK) for that host on every unit
  audit verify [--file PATH] | audit list            check or read the station's audit log
  (every admin command also takes --ca-file FILE or $IPSAN_CA_FILE for an https:// station)
`;

export async function main(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
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
    if (error instanceof UsageError) {
      process.stderr.write(`ipsan ${name}: ${error.message}\n`);
      return 2;
    }
    process.stderr.write(`ipsan ${name}: ${errorMessage(error)}\n`);
    if (process.env["IPSAN_DEBUG"]) process.stderr.write(`${(error as Error).stack ?? ""}\n`);
    return 1;
  }
}
