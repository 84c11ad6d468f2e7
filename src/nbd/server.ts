// The NBD server: accepts connections (TCP or Unix socket), bounds how many
// there are, and gives each one an NbdSession over the ExportProvider it was
// made with. The protocol itself is in handshake.ts and transmission.ts; the
// wire format in handshake_codec.ts and request_codec.ts.

import { unlink } from "node:fs/promises";
import * as net from "node:net";
import type { ExportProvider } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { logger } from "../util/log.ts";
import { ByteBudget } from "./budget.ts";
import { BufferPool } from "./buffer_pool.ts";
import { IoStats } from "./io_stats.ts";
import { LIMITS_ENV, type NbdLimits, parseLimitOverrides, resolveLimits } from "./limits.ts";
import { NbdSession, peerOf, type SessionHost } from "./session.ts";
import type { NbdServerTls } from "./tls.ts";

export { DEFAULT_NBD_LIMITS, LIMITS_ENV, type NbdLimits } from "./limits.ts";

const log = logger("nbd");

export interface NbdServerOptions {
  provider: ExportProvider;
  /** Over DEFAULT_NBD_LIMITS; the IPSAN_NBD_LIMITS environment variable ("key=value,...") overrides both. */
  limits?: Partial<NbdLimits>;
  /** Environment to read IPSAN_NBD_LIMITS from (default process.env). */
  env?: Readonly<Record<string, string | undefined>>;
  /** NBD_OPT_STARTTLS with TLS-PSK (src/nbd/tls.ts); absent: TLS off. */
  tls?: NbdServerTls;
  /** Where to count I/O per export (io_stats.ts); default a new IoStats, read at `server.stats`. */
  stats?: IoStats;
}

export type NbdListenAddress = { host: string; port: number } | { path: string };

export class NbdServer implements SessionHost {
  readonly provider: ExportProvider;
  readonly limits: NbdLimits;
  readonly budget: ByteBudget;
  readonly pool = new BufferPool();
  readonly tls: NbdServerTls | undefined;
  readonly stats: IoStats;
  private readonly sessions = new Set<NbdSession>();
  private readonly listeners: net.Server[] = [];
  private closing = false;
  private closePromise: Promise<void> | undefined;

  constructor(options: NbdServerOptions) {
    this.provider = options.provider;
    this.tls = options.tls;
    this.stats = options.stats ?? new IoStats();
    const fromEnv = parseLimitOverrides((options.env ?? process.env)[LIMITS_ENV] ?? "");
    this.limits = resolveLimits({ ...options.limits, ...fromEnv });
    this.budget = new ByteBudget(this.limits.serverBytesInFlightMax, { recentMs: this.limits.payloadTimeoutMs });
  }

  get shuttingDown(): boolean {
    return this.closing;
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  /** Listens on a TCP address (port 0 picks a free port) or a Unix socket path; resolves to the bound address. */
  async listen(address: NbdListenAddress): Promise<NbdListenAddress> {
    assert(!this.closing, "listen after close");
    const server = net.createServer({ noDelay: true, pauseOnConnect: false });
    server.on("connection", (socket) => this.handleConnection(socket));
    server.on("error", (error) => log.error("listener error", { error: error.message }));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      const done = (): void => {
        server.off("error", reject);
        resolve();
      };
      if ("path" in address) server.listen(address.path, done);
      else server.listen({ host: address.host, port: address.port, exclusive: true }, done);
    });
    this.listeners.push(server);
    const bound = server.address();
    if (bound === null || typeof bound === "string") return { path: "path" in address ? address.path : String(bound) };
    return { host: bound.address, port: bound.port };
  }

  /** Serves one accepted connection (used by listen, and by tests or other listeners). */
  handleConnection(socket: net.Socket): void {
    if (!this.closing && this.sessions.size >= this.limits.connectionsMax) this.evictOldestHandshake();
    if (this.closing || this.sessions.size >= this.limits.connectionsMax) {
      log.limited("connection_refused", this.closing ? "connection refused: server closing" : "connection refused: too many connections", {
        peer: `${socket.remoteAddress ?? "unix"}:${socket.remotePort ?? 0}`,
        connections: this.sessions.size,
        connectionsMax: this.limits.connectionsMax,
      });
      socket.on("error", () => undefined);
      socket.destroy();
      return;
    }
    const peer = peerOf(socket);
    if (this.provider.admitsConnection !== undefined && !this.provider.admitsConnection(peer)) {
      log.limited(`connection_not_admitted:${peer.address}`, "connection refused: peer is not allowed and holds no grant", {
        peer: `${peer.address}:${peer.port}`,
      });
      socket.on("error", () => undefined);
      socket.destroy();
      return;
    }
    this.sessions.add(new NbdSession(this, socket));
  }

  /**
   * At the connection limit, a new connection takes the place of the oldest
   * one still in the handshake: a flood of connections that never negotiate
   * churns among itself, and a real client (whose handshake takes a
   * millisecond) still gets in. Connections in transmission are never evicted.
   */
  private evictOldestHandshake(): void {
    for (const session of this.sessions) {
      if (session.state !== "greeting" && session.state !== "options") continue;
      log.limited("connection_evicted", "connection limit reached: dropping the oldest connection still in handshake", {
        peer: session.peerText,
        connectionsMax: this.limits.connectionsMax,
      });
      this.sessions.delete(session);
      session.hardDisconnect();
      return;
    }
  }

  sessionEnded(session: NbdSession): void {
    this.sessions.delete(session);
  }

  /** Stops accepting, lets requests in flight finish (bounded by closeTimeoutMs), then disconnects everyone. */
  close(): Promise<void> {
    this.closePromise ??= this.closeNow();
    return this.closePromise;
  }

  private async closeNow(): Promise<void> {
    this.closing = true;
    const paths = this.listeners.map((server) => server.address()).filter((bound) => typeof bound === "string");
    const listenersClosed = this.listeners.map(
      (server) => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    const sessions = [...this.sessions];
    for (const session of sessions) session.shutdown();
    const deadline = setTimeout(() => {
      for (const session of this.sessions) session.hardDisconnect();
    }, this.limits.closeTimeoutMs + 1000);
    // A device call that never returns must not hold close() forever.
    let giveUp: NodeJS.Timeout | undefined;
    const gaveUp = new Promise<void>((resolve) => {
      giveUp = setTimeout(resolve, this.limits.closeTimeoutMs + 2000);
    });
    await Promise.race([Promise.all(sessions.map((session) => session.ended)), gaveUp]);
    clearTimeout(deadline);
    clearTimeout(giveUp);
    await Promise.all(listenersClosed);
    for (const path of paths) await unlink(path).catch(() => undefined);
  }
}
