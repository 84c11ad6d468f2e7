// The CLI's configuration file, so nobody types --station and --token-file on
// every call (issue 9 item 5). Precedence, for every setting: the flag, then
// the environment variable, then the file. The file is the one named by the
// global flag --config FILE (or $IPSAN_CONFIG); else the first that exists of
// $XDG_CONFIG_HOME/ipsan/config (~/.config/ipsan/config) and /etc/ipsan/ipsan.conf.
//
// Format: `key = value` lines; `#` starts a comment line; keys are the long
// flag names below. A relative path in the file is relative to the file's
// directory. An unknown key, a malformed line or a missing --config file is a
// usage error naming the file and the line (docs/OPERATIONS.md "Configuration").

import { existsSync, readFileSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { UsageError, errorMessage } from "./errors.ts";

/** Each setting: its key in the file and its environment variable. */
export const CONFIG_SETTINGS = {
  station: { env: "IPSAN_STATION", path: false },
  "token-file": { env: "IPSAN_TOKEN_FILE", path: true },
  "ca-file": { env: "IPSAN_CA_FILE", path: true },
  "state-dir": { env: "IPSAN_STATE_DIR", path: true },
  host: { env: "IPSAN_HOST", path: false },
  /** The host's iSCSI initiator name (ipsan host agent/request/register --iqn). */
  iqn: { env: "IPSAN_IQN", path: false },
} as const;
export type ConfigKey = keyof typeof CONFIG_SETTINGS;

export const CONFIG_ENV = "IPSAN_CONFIG";
export const CONFIG_BYTES_MAX = 64 * 1024;
export const SYSTEM_CONFIG_PATH = "/etc/ipsan/ipsan.conf";

/** The user's config file: $XDG_CONFIG_HOME/ipsan/config, or ~/.config/ipsan/config. */
export function userConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  const base = env["XDG_CONFIG_HOME"] !== undefined && env["XDG_CONFIG_HOME"] !== "" ? env["XDG_CONFIG_HOME"] : join(homedir(), ".config");
  return join(base, "ipsan", "config");
}

export interface ConfigFile {
  /** null: no file (none named, none found). */
  readonly path: string | null;
  readonly values: Readonly<Partial<Record<ConfigKey, string>>>;
}

/** Parses a config file's text; `path` names it in errors and anchors relative paths. */
export function parseConfig(text: string, path: string): Partial<Record<ConfigKey, string>> {
  const values: Partial<Record<ConfigKey, string>> = {};
  text.split("\n").forEach((raw, index) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const where = `${path}:${index + 1}`;
    const match = /^([a-z][a-z-]*)\s*=\s*(.*)$/.exec(line);
    if (match === null) throw new UsageError(`${where}: expected "key = value", got ${JSON.stringify(line.slice(0, 80))}`);
    const key = match[1] as string;
    const value = (match[2] as string).trim();
    if (!(key in CONFIG_SETTINGS)) throw new UsageError(`${where}: unknown key "${key}" (known: ${Object.keys(CONFIG_SETTINGS).join(", ")})`);
    if (value === "") throw new UsageError(`${where}: ${key} has no value`);
    const setting = CONFIG_SETTINGS[key as ConfigKey];
    values[key as ConfigKey] = setting.path && !isAbsolute(value) ? resolve(dirname(path), value) : value;
  });
  return values;
}

/** Reads the config file that applies (see the top of this file). */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): ConfigFile {
  const named = env[CONFIG_ENV];
  let path: string | null = null;
  if (named !== undefined && named !== "") {
    path = resolve(named);
    if (!existsSync(path)) throw new UsageError(`--config: "${path}" does not exist`);
  } else {
    path = [userConfigPath(env), SYSTEM_CONFIG_PATH].find((candidate) => existsSync(candidate)) ?? null;
  }
  if (path === null) return { path: null, values: {} };
  let text: string;
  try {
    if (statSync(path).size > CONFIG_BYTES_MAX) throw new Error(`larger than ${CONFIG_BYTES_MAX} bytes`);
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new UsageError(`config ${path}: cannot read it: ${errorMessage(error)}`);
  }
  return { path, values: parseConfig(text, path) };
}

let cached: ConfigFile | undefined;

/** A setting: the flag's value, else its environment variable, else the config file's (read once per process). */
export function setting(key: ConfigKey, flagValue: string | undefined, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (flagValue !== undefined && flagValue !== "") return flagValue;
  const fromEnv = env[CONFIG_SETTINGS[key].env];
  if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  cached ??= loadConfig(env);
  return cached.values[key];
}

/** Where else a setting may come from (for error messages): 'or $IPSAN_STATION, or "station = ..." in FILE'. */
export function settingSources(key: ConfigKey): string {
  return `or $${CONFIG_SETTINGS[key].env}, or "${key} = ..." in ${cached?.path ?? `${userConfigPath()} or ${SYSTEM_CONFIG_PATH}`}`;
}

/** The text of a config file with these settings (ipsan demo writes one). */
export function formatConfig(values: Partial<Record<ConfigKey, string>>, comment: string): string {
  const lines = [`# ${comment}`];
  for (const key of Object.keys(CONFIG_SETTINGS) as ConfigKey[]) {
    const value = values[key];
    if (value !== undefined) lines.push(`${key} = ${value}`);
  }
  return `${lines.join("\n")}\n`;
}
