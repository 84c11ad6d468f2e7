// The web console's static files (docs/console.md), served WITHOUT a token:
// `/` (index.html), `/assets/*` and the other top-level files of the console
// directory (Vite's output, dist/console). Only regular files under that
// directory are served: no directory listing, no path outside it (.., encoded
// slashes, symbolic links out of it), no hidden files, at most
// CONSOLE_FILE_BYTES_MAX bytes. Every /api/v1 call still needs the bearer token.
// When the console is not built, `/` says how to build it.

import { createReadStream } from "node:fs";
import { realpath, stat } from "node:fs/promises";
import { extname, join, sep } from "node:path";
import { Type } from "@sinclair/typebox";
import { IpsanError } from "../../util/errors.ts";
import type { Api, Context } from "./route.ts";
import { CONSOLE_FILE_BYTES_MAX } from "./limits.ts";

const CONTENT_TYPES: Readonly<Record<string, string>> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".woff2": "font/woff2",
  ".txt": "text/plain; charset=utf-8",
  ".webmanifest": "application/manifest+json",
};
/** One path segment of a served file: no hidden files, no .., no separators. */
const SEGMENT = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

export const NOT_BUILT_PAGE =
  "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ipsan station</title></head>\n" +
  "<body><h1>ipsan station</h1><p>The console is not built: run npm run build:console " +
  "(scripts/setup does), or start the station with <code>--console-dir DIR</code>. " +
  "The REST API is at <code>/api/v1</code> (docs/api.md).</p></body></html>\n";

const notFound = (path: string) => new IpsanError("NOT_FOUND", `no such path: GET ${path}`, { field: "path" });

/** The file `segments` names under `root`, if it is a regular file inside it; else null. */
async function resolveFile(root: string, segments: readonly string[]): Promise<{ path: string; size: number } | null> {
  if (segments.length === 0 || segments.length > 8 || !segments.every((s) => SEGMENT.test(s) && !s.includes(".."))) return null;
  let realRoot: string;
  try {
    realRoot = await realpath(root);
  } catch {
    return null;
  }
  try {
    const path = await realpath(join(realRoot, ...segments));
    if (!path.startsWith(realRoot + sep)) return null;
    const info = await stat(path);
    if (!info.isFile() || info.size > CONSOLE_FILE_BYTES_MAX) return null;
    return { path, size: info.size };
  } catch {
    return null;
  }
}

export function consoleRoutes(api: Api): void {
  const serve = async (ctx: Context, segments: readonly string[], fallback: boolean) => {
    const file = await resolveFile(api.consoleDir, segments);
    if (file === null) {
      if (fallback) return { status: 200, body: NOT_BUILT_PAGE, headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" } };
      throw notFound(ctx.request.url.split("?")[0] ?? "/");
    }
    const immutable = segments[0] === "assets" && segments.length > 1;
    ctx.reply
      .code(200)
      .header("content-type", CONTENT_TYPES[extname(file.path).toLowerCase()] ?? "application/octet-stream")
      .header("content-length", String(file.size))
      .header("cache-control", immutable ? "public, max-age=31536000, immutable" : "no-cache")
      .header("x-content-type-options", "nosniff")
      .header("x-frame-options", "DENY")
      .header("referrer-policy", "no-referrer")
      .header("content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'");
    await ctx.reply.send(createReadStream(file.path));
    return null;
  };
  const schema = (summary: string) => ({ summary, hide: true, response: { 200: Type.String() } });
  api.add({ method: "GET", url: "/", public: true, schema: schema("The console"), handler: (ctx) => serve(ctx, ["index.html"], true) });
  api.add({
    method: "GET",
    url: "/assets/*",
    public: true,
    schema: schema("The console's assets"),
    handler: (ctx) => serve(ctx, ["assets", ...String((ctx.request.params as { "*"?: string })["*"] ?? "").split("/")], false),
  });
  api.add({
    method: "GET",
    url: "/:file",
    public: true,
    schema: schema("The console's other top-level files (favicon, ...)"),
    handler: (ctx) => serve(ctx, [ctx.params[0] ?? ""], false),
  });
}
