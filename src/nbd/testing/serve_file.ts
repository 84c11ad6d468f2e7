// Development aid: serves files as NBD exports with the in-process file
// provider, for trying clients and quick fio runs before (or beside) a unit.
// usage: node dist/nbd/testing/serve_file.js HOST:PORT NAME=PATH...
// Prints "nbd://HOST:PORT" on stdout when listening.

import { statSync } from "node:fs";
import { parseHostPort } from "../../util/flags.ts";
import { NbdServer } from "../server.ts";
import { FileExportProvider } from "./file_provider.ts";

const [listen = "127.0.0.1:0", ...specs] = process.argv.slice(2);
const exports = specs.map((spec) => {
  const [name = "", path = ""] = spec.split("=");
  return { name, path, sizeBytes: statSync(path).size, description: `file ${path}` };
});
const server = new NbdServer({ provider: new FileExportProvider(exports, exports[0]?.name) });
const bound = await server.listen(parseHostPort(listen, "listen"));
process.stdout.write("host" in bound ? `nbd://${bound.host}:${bound.port}\n` : `nbd+unix:///?socket=${bound.path}\n`);
const stop = (): void => {
  void server.close().then(() => process.exit(0));
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
