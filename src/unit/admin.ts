// `ipsan unit volume ...`: volume administration for a standalone unit.
//
// Offline (--data DIR [--device PATH]): opens the storage itself, holding
// DATA/unit.lock, so it refuses to run while a unit serves that storage.
// Online (--control http://HOST:PORT): calls the running unit's control API
// with the token from --token-file (default DATA/control.token when --data
// is also given).

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { IpsanError, UsageError, errorMessage, type ErrorCode, ERROR_CODES } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { printItems } from "../util/output.ts";
import { formatSize, parsePartitionSizes, parseSize } from "../util/size.ts";
import { HttpExchangeError, answerJson, httpExchange, type HttpAnswer } from "../util/http_client.ts";
import { CONTROL_TOKEN_FILE_NAME } from "./main.ts";
import { STORAGE_FILE_NAME, type VolumeView, VolumeManager, volumeView } from "./volumes.ts";

/** Time allowed for one control API call. */
export const ADMIN_REQUEST_TIMEOUT_MS = 30_000;
/** The most of a unit's answer `ipsan unit volume` reads (a listing of 4096 volumes fits easily). */
export const ADMIN_RESPONSE_BYTES_MAX = 16 * 1024 * 1024;

export const USAGE = `usage: ipsan unit volume COMMAND (--data DIR [--device PATH] | --control http://HOST:PORT [--token-file FILE]) [--json]
commands:
  list                       list volumes (extents in absolute LBAs; partitions relative to the volume)
  create NAME SIZE           create a volume
  delete NAME                delete a volume (its data is gone)
  grow NAME SIZE             grow a volume to SIZE in total
  partition NAME [SIZE...]   replace the volume's partitions (sizes as arguments or comma-separated; none: remove them); exported as NAME/p1, NAME/p2, ...
  grant NAME [HOST|CIDR...]  replace the hosts that may open the volume (none: back to --allow)
  wipe NAME                  make the whole volume read as zeroes (refused while it has grants or is open)
--data works only while no unit runs on DIR; use --control to change a running unit.`;

interface Target {
  create(name: string, sizeBytes: number): Promise<VolumeView>;
  delete(name: string): Promise<void>;
  grow(name: string, sizeBytes: number): Promise<VolumeView>;
  partition(name: string, sizesBytes: number[]): Promise<VolumeView>;
  grant(name: string, hosts: string[]): Promise<VolumeView>;
  wipe(name: string): Promise<VolumeView>;
  list(): Promise<VolumeView[]>;
  close(): Promise<void>;
}

async function offlineTarget(dataDir: string, devicePath: string | undefined): Promise<Target> {
  if (devicePath === undefined && !existsSync(join(dataDir, STORAGE_FILE_NAME))) {
    throw new UsageError(`--data: no unit storage in "${dataDir}" (start "ipsan unit --data ${dataDir} --capacity SIZE --listen HOST:PORT" once first)`);
  }
  const manager = await VolumeManager.open({ dataDir, devicePath });
  return {
    create: async (name, size) => volumeView(await manager.create(name, size)),
    delete: (name) => manager.delete(name),
    grow: async (name, size) => volumeView(await manager.grow(name, size)),
    partition: async (name, sizes) => volumeView(await manager.setPartitions(name, sizes)),
    grant: async (name, hosts) => volumeView(await manager.setGrants(name, hosts)),
    wipe: async (name) => volumeView(await manager.wipe(name)),
    list: async () => [...manager.snapshot().volumes],
    close: () => manager.close(),
  };
}

function onlineTarget(baseUrl: string, token: string): Target {
  const call = async (method: string, path: string, body?: unknown): Promise<unknown> => {
    let answer: HttpAnswer;
    try {
      answer = await httpExchange({
        url: new URL(path, baseUrl),
        method,
        headers: { authorization: `Bearer ${token}`, accept: "application/json" },
        ...(body === undefined ? {} : { json: body }),
        timeoutMs: ADMIN_REQUEST_TIMEOUT_MS,
        maxBytes: ADMIN_RESPONSE_BYTES_MAX,
      });
    } catch (error) {
      if (error instanceof HttpExchangeError && error.failure === "too-large") throw new IpsanError("TOO_LARGE", error.message, { cause: error });
      throw new IpsanError("UNAVAILABLE", `unit control API ${baseUrl}: ${errorMessage(error)}`, { cause: error });
    }
    let json: unknown;
    try {
      json = answerJson(answer);
    } catch {
      throw new IpsanError("IO_ERROR", `unit control API ${baseUrl}: ${method} ${path} answered ${answer.status} with non-JSON`);
    }
    if (answer.status < 200 || answer.status >= 300) {
      const error = (json as { error?: { code?: string; message?: string; field?: string } } | undefined)?.error;
      const code = error?.code !== undefined && error.code in ERROR_CODES ? (error.code as ErrorCode) : "IO_ERROR";
      throw new IpsanError(code, error?.message ?? `HTTP ${answer.status}`, error?.field === undefined ? {} : { field: error.field });
    }
    return json;
  };
  const volumePath = (name: string, tail = ""): string => `/v1/volumes/${encodeURIComponent(name)}${tail}`;
  return {
    create: async (name, sizeBytes) => (await call("POST", "/v1/volumes", { name, sizeBytes })) as VolumeView,
    delete: async (name) => {
      await call("DELETE", volumePath(name));
    },
    grow: async (name, sizeBytes) => (await call("POST", volumePath(name, "/grow"), { sizeBytes })) as VolumeView,
    partition: async (name, sizesBytes) => (await call("PUT", volumePath(name, "/partitions"), { sizesBytes })) as VolumeView,
    grant: async (name, hosts) => (await call("PUT", volumePath(name, "/grants"), { hosts })) as VolumeView,
    wipe: async (name) => (await call("POST", volumePath(name, "/wipe"))) as VolumeView,
    list: async () => ((await call("GET", "/v1/volumes")) as { items: VolumeView[] }).items,
    close: async () => {},
  };
}

function describeVolume(v: VolumeView): string {
  const extents = v.extents.map((e) => `${e.startLba}-${e.endLba}`).join(",");
  const partitions = v.partitions.map((p) => `${p.name}=${formatSize(p.sizeBytes)}`).join(",") || "-";
  // Identity grants as id:HOST@EXPORT (with [from,...] when they name addresses).
  const access = v.access.map((a) => `id:${a.host}@${a.export}${a.from.length === 0 ? "" : `[${a.from.join(",")}]`}`);
  return `${v.name}\t${v.number}\t${v.sizeBytes}\t${formatSize(v.sizeBytes)}\t${extents}\t${partitions}\t${[...v.grants, ...access].join(",") || "-"}`;
}

export async function volumeMain(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === "help" || command === "--help") {
    process.stdout.write(`${USAGE}\n`);
    return command === undefined ? 2 : 0;
  }
  const { values, positionals } = parseFlags(
    rest,
    {
      data: { type: "string" },
      device: { type: "string" },
      control: { type: "string" },
      "token-file": { type: "string" },
      json: { type: "boolean" },
    },
    true,
  );
  const need = (count: number, what: string): void => {
    if (positionals.length !== count) throw new UsageError(`volume ${command}: expected ${what}, got ${JSON.stringify(positionals)}\n${USAGE}`);
  };
  const nameArg = (): string => positionals[0] ?? "";
  // Parse every value before touching the storage, so bad input is a usage error (exit 2).
  const sizes = (texts: readonly string[], field: (i: number) => string): number[] => texts.map((text, i) => parseSize(text, field(i)));
  let run: (target: Target) => Promise<unknown>;
  switch (command) {
    case "list":
      need(0, "no arguments");
      run = (t) => t.list();
      break;
    case "create": {
      need(2, "NAME SIZE");
      const [size = 0] = sizes(positionals.slice(1), () => "SIZE");
      run = (t) => t.create(nameArg(), size);
      break;
    }
    case "delete":
      need(1, "NAME");
      run = (t) => t.delete(nameArg());
      break;
    case "grow": {
      need(2, "NAME SIZE");
      const [size = 0] = sizes(positionals.slice(1), () => "SIZE");
      run = (t) => t.grow(nameArg(), size);
      break;
    }
    case "partition": {
      if (positionals.length < 1) need(1, "NAME [SIZE...]");
      // One grammar with ipsan volume partition: separate arguments, comma-separated, or both; "none" clears.
      const partitionSizes = parsePartitionSizes(positionals.slice(1));
      run = (t) => t.partition(nameArg(), partitionSizes);
      break;
    }
    case "grant":
      if (positionals.length < 1) need(1, "NAME [HOST|CIDR...]");
      run = (t) => t.grant(nameArg(), positionals.slice(1));
      break;
    case "wipe":
      need(1, "NAME");
      run = (t) => t.wipe(nameArg());
      break;
    default:
      throw new UsageError(`volume: unknown command "${command}"\n${USAGE}`);
  }
  let target: Target;
  if (values.control !== undefined) {
    if (!/^https?:\/\/[^/]+\/?$/.test(values.control)) throw new UsageError(`--control: invalid URL "${values.control}" (expected http://HOST:PORT)`);
    const tokenPath = values["token-file"] ?? (values.data === undefined ? undefined : join(values.data, CONTROL_TOKEN_FILE_NAME));
    if (tokenPath === undefined) throw new UsageError("--token-file FILE (or --data DIR holding control.token) is required with --control");
    let token: string;
    try {
      token = readFileSync(tokenPath, "utf8").trim();
    } catch (error) {
      throw new UsageError(`--token-file: cannot read "${tokenPath}": ${errorMessage(error)}`);
    }
    target = onlineTarget(values.control, token);
  } else if (values.data !== undefined) {
    try {
      target = await offlineTarget(values.data, values.device);
    } catch (error) {
      if (error instanceof IpsanError && error.code === "CONFLICT") {
        throw new IpsanError("CONFLICT", `${error.message}; change a running unit with --control http://HOST:PORT`);
      }
      throw error;
    }
  } else {
    throw new UsageError(`volume ${command}: --data DIR or --control URL is required\n${USAGE}`);
  }
  try {
    let result: unknown;
    try {
      result = await run(target);
    } catch (error) {
      if (error instanceof IpsanError && error.code === "INVALID_ARGUMENT") throw new UsageError(error.message);
      throw error;
    }
    if (values.json === true) {
      // A listing is {"items": [...]}, as every listing's --json (src/util/output.ts).
      if (Array.isArray(result)) printItems(result);
      else process.stdout.write(`${JSON.stringify(result ?? { name: nameArg(), deleted: true }, null, 2)}\n`);
    } else if (Array.isArray(result)) {
      process.stdout.write("NAME\tNUMBER\tBYTES\tSIZE\tEXTENTS(LBA)\tPARTITIONS\tGRANTS\n");
      for (const v of result as VolumeView[]) process.stdout.write(`${describeVolume(v)}\n`);
    } else if (result !== undefined) {
      process.stdout.write(`${describeVolume(result as VolumeView)}\n`);
    } else {
      process.stdout.write(`deleted ${nameArg()}\n`);
    }
  } finally {
    await target.close();
  }
  return 0;
}
