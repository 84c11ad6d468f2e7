// Real headless Chromium for the console's browser tests: Debian's
// /usr/bin/chromium (scripts/setup installs it) driven by playwright-core with
// executablePath; nothing downloads a browser. Each launch gets a fresh
// profile (playwright makes a new empty user-data dir) and the flags that keep
// Chromium off the network (this machine's network is closed). Screenshots go
// to the artifacts dir: $IPSAN_ARTIFACTS/NAME, else test-artifacts/NAME in the
// checkout (gitignored).

import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { REPO_ROOT } from "./unit.ts";

export const CHROMIUM_PATH = process.env["IPSAN_CHROMIUM"] ?? "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
];
export const BROWSER_LAUNCH_TIMEOUT_MS = 30_000;

export async function launchChromium(): Promise<Browser> {
  if (!existsSync(CHROMIUM_PATH)) throw new Error(`no Chromium at ${CHROMIUM_PATH}: scripts/setup installs Debian's chromium (or set IPSAN_CHROMIUM)`);
  return chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS, headless: true, timeout: BROWSER_LAUNCH_TIMEOUT_MS });
}

/** The directory a test's artifacts (screenshots) go to, created. */
export function artifactsDir(name: string): string {
  const base = process.env["IPSAN_ARTIFACTS"] ?? join(REPO_ROOT, "test-artifacts");
  const dir = join(base, name);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** Opens the console at `url` and signs in with `token` (the contract's names: field "Token", button "Sign in"). */
export async function signIn(page: Page, url: string, token: string): Promise<void> {
  await page.goto(url);
  await page.getByLabel("Token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("link", { name: "Pool", exact: true }).waitFor({ timeout: 10_000 });
}

/** The row of a table whose row header is exactly `name`. */
export function rowOf(page: Page, table: string, name: string) {
  return page.getByRole("table", { name: table, exact: true }).getByRole("row").filter({ has: page.getByRole("rowheader", { name, exact: true }) });
}
