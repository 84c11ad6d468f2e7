// Test helpers for nbds:// URIs (issue 7): an admin's view of a host's URI
// (the station answers nbds://HOST@UNIT:PORT/EXPORT without a key file; this
// fetches the host's key for that unit with the admin token and writes it),
// and what qemu needs instead of a URI (it takes no nbds:// scheme: a
// tls-creds-psk object and --image-opts).

import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { withPskFile } from "../host/keys.ts";
import type { StationClient } from "../host/station_client.ts";

/** `uri` (nbds://HOST@...) with a key file for `unit` written under `dir` from the station's keys of HOST. */
export async function adminLocalUri(client: StationClient, uri: string, unit: string, dir: string): Promise<string> {
  if (!uri.startsWith("nbds://")) return uri;
  const host = decodeURIComponent(new URL(uri).username);
  const key = (await client.hostKeys(host)).find((k) => k.unit === unit);
  if (key === undefined) throw new Error(`the station has no key of host ${host} for unit ${unit}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const path = join(dir, `${host}@${unit}.psk`);
  writeFileSync(path, `${key.identity}:${key.key}\n`, { mode: 0o600 });
  return withPskFile(uri, path);
}

let qemuObjects = 0;

/**
 * qemu-img/qemu-io arguments that open `uri` raw: for nbd:// the URI itself
 * (-f raw URI), for nbds://ID@HOST:PORT/EXPORT?tls-psk-file=F a
 * tls-creds-psk object (dir `F.qemu/` with keys.psk, as qemu wants it) and
 * --image-opts. Returns the object args and the image args apart (qemu-img
 * compare takes two images but one set of objects).
 */
export function qemuImage(uri: string): { objects: string[]; image: string[] } {
  if (!uri.startsWith("nbds://")) return { objects: [], image: ["-f", "raw", uri] };
  const url = new URL(uri);
  const file = url.searchParams.get("tls-psk-file");
  if (file === null) throw new Error(`${uri}: no tls-psk-file`);
  const dir = `${file}.qemu`;
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const identity = decodeURIComponent(url.username);
  const id = `tls${++qemuObjects}`;
  // keys.psk holds the same line as the key file (psktool format).
  writeFileSync(join(dir, "keys.psk"), `${identity}:${readKey(file, identity)}\n`, { mode: 0o600 });
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  return {
    objects: ["--object", `tls-creds-psk,id=${id},endpoint=client,dir=${dir},username=${identity}`],
    image: ["--image-opts", `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=${host},file.server.port=${url.port || "10809"},file.export=${exportName},file.tls-creds=${id}`],
  };
}

function readKey(file: string, identity: string): string {
  const text = readFileSync(file, "utf8");
  const line = text.split("\n").find((l) => l.startsWith(`${identity}:`));
  if (line === undefined) throw new Error(`${file}: no key for ${identity}`);
  return line.slice(identity.length + 1).trim();
}

/**
 * `qemu-img compare` arguments for two raw NBD exports, either nbd:// or
 * nbds://...?tls-psk-file=F. qemu-img's --image-opts applies to both images,
 * so when either is nbds:// both are given as options (an nbd:// URI as
 * file.filename) with the TLS objects before them.
 */
export function qemuCompareArgs(a: string, b: string): string[] {
  if (!a.startsWith("nbds://") && !b.startsWith("nbds://")) return ["compare", "-f", "raw", "-F", "raw", a, b];
  const images = [a, b].map((uri) => (uri.startsWith("nbds://") ? qemuImage(uri) : { objects: [], image: ["--image-opts", `driver=raw,file.filename=${uri.replace(/,/g, ",,")}`] }));
  return ["compare", ...images.flatMap((i) => i.objects), "--image-opts", ...images.map((i) => i.image[1] as string)];
}
