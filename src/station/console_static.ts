// The web console's static files (docs/console.md): `GET /` answers
// index.html and `GET /assets/NAME` one file Vite built, from `consoleDir`
// (default dist/console beside the compiled station), WITHOUT a token: these
// are public files; every /api/v1 call the console makes still needs the
// bearer token. No listing, no other path, no traversal: an asset name is one
// path segment of [A-Za-z0-9_.-] that does not start with a dot. A missing
// build answers `/` with a page saying how to build it. Framework-agnostic
// (answers a plain object) so any HTTP layer can serve it.

import { promises as fs } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** dist/console next to the compiled station (dist/station/console_static.js). */
export const CONSOLE_DIR_DEFAULT = join(dirname(fileURLToPath(import.meta.url)), "..", "console");
/** The largest console file served (the bundle is ~100 KiB). */
export const CONSOLE_FILE_BYTES_MAX = 8 * 1024 * 1024;

const TYPES: Readonly<Record<string, string>> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".woff2": "font/woff2",
  ".map": "application/json; charset=utf-8",
};

const ASSET = /^\/assets\/([A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})$/;

/** Headers every console answer carries: no framing, no sniffing, scripts and API calls from this origin only. */
const SECURITY_HEADERS: Readonly<Record<string, string>> = {
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "referrer-policy": "no-referrer",
  "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
};

export interface StaticAnswer {
  readonly status: number;
  readonly headers: Record<string, string>;
  readonly body: Buffer;
}

const NOT_BUILT = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ipsan console</title></head>
<body><h1>ipsan console not built</h1><p>The station serves the web console from its console directory, which has no
index.html. Build it with <code>npm run build:console</code> (or <code>scripts/setup</code>) and reload.
The REST API under <code>/api/v1</code> works without it.</p></body></html>
`;

/** True for the paths the console owns (served without a token). */
export function isConsolePath(method: string | undefined, pathname: string): boolean {
  return (method === "GET" || method === "HEAD") && (pathname === "/" || pathname === "/index.html" || pathname.startsWith("/assets/"));
}

/** The answer for a console path (see isConsolePath). */
export async function consoleFile(consoleDir: string, pathname: string): Promise<StaticAnswer> {
  const text = (status: number, message: string): StaticAnswer => ({
    status,
    headers: { ...SECURITY_HEADERS, "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" },
    body: Buffer.from(`${message}\n`),
  });
  let file: string;
  let immutable = false;
  if (pathname === "/" || pathname === "/index.html") file = join(consoleDir, "index.html");
  else {
    const match = ASSET.exec(pathname);
    if (match === null) return text(404, "not found");
    file = join(consoleDir, "assets", match[1] ?? "");
    immutable = true; // Vite puts a content hash in every asset's name
  }
  let body: Buffer;
  try {
    const stat = await fs.stat(file);
    if (!stat.isFile() || stat.size > CONSOLE_FILE_BYTES_MAX) return text(404, "not found");
    body = await fs.readFile(file);
  } catch {
    if (!immutable) return { status: 200, headers: { ...SECURITY_HEADERS, "content-type": TYPES[".html"] ?? "", "cache-control": "no-store" }, body: Buffer.from(NOT_BUILT) };
    return text(404, "not found");
  }
  const dot = file.lastIndexOf(".");
  const type = TYPES[file.slice(dot)] ?? "application/octet-stream";
  return {
    status: 200,
    headers: { ...SECURITY_HEADERS, "content-type": type, "cache-control": immutable ? "public, max-age=31536000, immutable" : "no-cache" },
    body,
  };
}
