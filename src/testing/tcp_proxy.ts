// A TCP proxy a test controls, in front of one target (a unit, an etcd
// member): it listens on 127.0.0.1:0 and forwards each connection to the
// target, and the test switches how the network behaves:
//
// - pass(): bytes flow both ways (the default).
// - blackhole(): a partition without RST. Connections stay open (no FIN, no
//   RST reaches either side, also when the other side closes or fails), new
//   connections are accepted, and every byte both ways is read and dropped. A
//   client notices only by its own timeouts or keepalives.
// - cut(): every connection is reset (RST) and the listener closed, so new
//   connections are refused (ECONNREFUSED).
// - back to pass(): the listener is reopened on the same port (after cut()),
//   and connections that lived through a blackhole are reset: their byte
//   streams lost bytes, which TCP itself never does, so they cannot go on (as
//   after a partition longer than TCP's retransmission timeout). Clients
//   reconnect through the proxy.
//
// Byte counters tell what went through: the mirror engine's tests count what
// an engine sends to a unit (src/testing/mirror_bed.ts startRelay).

import { createServer, connect, type Server, type Socket } from "node:net";

export type TcpProxyMode = "pass" | "blackhole" | "cut";

export interface TcpProxyOptions {
  /** Default 127.0.0.1. */
  targetHost?: string;
  targetPort: number;
}

export interface TcpProxy {
  /** 127.0.0.1 */
  readonly host: string;
  readonly port: number;
  /** "127.0.0.1:PORT" */
  readonly address: string;
  /** "SCHEME://127.0.0.1:PORT" (default scheme http), e.g. an etcd endpoint through the proxy. */
  url(scheme?: string): string;
  mode(): TcpProxyMode;
  /** Forward again; after cut() it listens again on the same port, after blackhole() it resets the connections that lost bytes. */
  pass(): Promise<void>;
  /** Keep every connection open but drop every byte both ways. */
  blackhole(): void;
  /** Reset every connection and refuse new ones until pass(). */
  cut(): Promise<void>;
  /** Resets every connection and stops listening for good. */
  close(): Promise<void>;
  /** Client connections open now. */
  connections(): number;
  /** Bytes forwarded from clients to the target. */
  bytesToTarget(): number;
  /** Bytes forwarded from the target to clients. */
  bytesToClient(): number;
  /** Bytes dropped (both ways) while blackholed. */
  droppedBytes(): number;
}

interface Pair {
  client: Socket;
  upstream: Socket | undefined;
  /** Lost bytes or a close in a blackhole: reset at the next pass(). */
  broken: boolean;
}

export async function startTcpProxy(options: TcpProxyOptions): Promise<TcpProxy> {
  const host = "127.0.0.1";
  const targetHost = options.targetHost ?? "127.0.0.1";
  const targetPort = options.targetPort;
  if (!Number.isInteger(targetPort) || targetPort <= 0 || targetPort > 65535) throw new Error(`startTcpProxy: target port ${String(targetPort)} is not a TCP port`);
  let mode: TcpProxyMode = "pass";
  let closed = false;
  let toTarget = 0;
  let toClient = 0;
  let dropped = 0;
  const pairs = new Set<Pair>();

  const reset = (socket: Socket | undefined): void => {
    if (socket === undefined || socket.destroyed) return;
    // RST when the socket is connected; a socket still connecting just goes away.
    if (socket.readyState === "open" || socket.readyState === "readOnly" || socket.readyState === "writeOnly") socket.resetAndDestroy();
    else socket.destroy();
  };
  const end = (pair: Pair): void => {
    reset(pair.client);
    reset(pair.upstream);
    pairs.delete(pair);
  };

  /** Forwards `from` to `to` in pass mode (with backpressure), drops in a blackhole. */
  const relay = (pair: Pair, from: Socket, to: () => Socket | undefined, count: (n: number) => void): void => {
    from.on("data", (chunk: Buffer) => {
      const target = to();
      if (mode !== "pass" || pair.broken || target === undefined) {
        dropped += chunk.length;
        pair.broken = true;
        return;
      }
      count(chunk.length);
      if (!target.write(chunk)) {
        from.pause();
        target.once("drain", () => from.resume());
      }
    });
    from.on("end", () => {
      // A clean close is passed on as a clean close (FIN after the queued bytes); a partition passes nothing.
      if (mode === "pass" && !pair.broken) to()?.end();
      else pair.broken = true;
    });
    from.on("error", () => {
      if (mode === "blackhole") pair.broken = true;
      else end(pair);
    });
    from.on("close", () => {
      if (mode === "blackhole") {
        pair.broken = true;
        return;
      }
      const other = to();
      if (other === undefined || other.destroyed) pairs.delete(pair);
      else other.end();
    });
  };

  const connectUpstream = (pair: Pair): void => {
    const upstream = connect({ host: targetHost, port: targetPort });
    pair.upstream = upstream;
    relay(pair, upstream, () => pair.client, (n) => (toClient += n));
  };

  const server: Server = createServer((client) => {
    if (closed || mode === "cut") {
      reset(client);
      return;
    }
    const pair: Pair = { client, upstream: undefined, broken: false };
    pairs.add(pair);
    relay(pair, client, () => pair.upstream, (n) => (toTarget += n));
    // A connection opened in a blackhole gets no upstream (nothing leaves the partition); it is reset at pass().
    if (mode === "blackhole") pair.broken = true;
    else connectUpstream(pair);
  });
  server.on("error", () => {}); // a listen error is reported by listen() below

  const listen = (port: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(new Error(`tcp proxy cannot listen on ${host}:${port}: ${error.message}`, { cause: error }));
      server.once("error", onError);
      server.listen({ host, port, exclusive: true }, () => {
        server.off("error", onError);
        resolve();
      });
    });
  const stopListening = (): Promise<void> =>
    server.listening ? new Promise((resolve) => server.close(() => resolve())) : Promise.resolve();

  await listen(0);
  const address = server.address();
  if (address === null || typeof address !== "object") throw new Error("tcp proxy: no address from the OS");
  const port = address.port;

  return {
    host,
    port,
    address: `${host}:${port}`,
    url: (scheme = "http") => `${scheme}://${host}:${port}`,
    mode: () => mode,
    async pass() {
      if (closed) throw new Error(`tcp proxy ${host}:${port} is closed`);
      if (mode === "cut") await listen(port);
      mode = "pass";
      for (const pair of [...pairs]) if (pair.broken) end(pair);
    },
    blackhole() {
      if (closed) throw new Error(`tcp proxy ${host}:${port} is closed`);
      if (mode === "cut") throw new Error(`tcp proxy ${host}:${port} is cut: pass() first`);
      mode = "blackhole";
    },
    async cut() {
      if (closed) throw new Error(`tcp proxy ${host}:${port} is closed`);
      mode = "cut";
      for (const pair of [...pairs]) end(pair);
      await stopListening();
    },
    async close() {
      closed = true;
      mode = "cut";
      for (const pair of [...pairs]) end(pair);
      await stopListening();
    },
    connections: () => pairs.size,
    bytesToTarget: () => toTarget,
    bytesToClient: () => toClient,
    droppedBytes: () => dropped,
  };
}
