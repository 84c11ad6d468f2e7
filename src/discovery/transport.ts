// The UDP socket under the discovery protocol, behind a two-method interface
// so a test can wrap it (loss, duplication, reordering) and one process can
// host many simulated units on one socket (sim_units.ts).

import dgram from "node:dgram";
import { isIP } from "node:net";
import { logger } from "../util/log.ts";
import { errorMessage } from "../util/errors.ts";

export interface Address {
  readonly host: string;
  readonly port: number;
}

export interface DatagramSocket {
  send(bytes: Buffer, to: Address): void;
  close(): Promise<void>;
  readonly local: Address;
}

export type DatagramHandler = (bytes: Buffer, from: Address) => void;

/** Socket receive buffer we ask for: a burst of 1,000 units' storage info fits. */
const RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024;

const log = logger("discovery");

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || (isIP(host) === 4 && host.startsWith("127."));
}

/** Binds a UDP socket (port 0 picks a free one) and reports datagrams to `onDatagram`. */
export async function openUdpSocket(bind: Address, onDatagram: DatagramHandler): Promise<DatagramSocket> {
  const type = isIP(bind.host) === 6 ? "udp6" : "udp4";
  const socket = dgram.createSocket({ type, reuseAddr: false });
  socket.on("message", (bytes, rinfo) => {
    onDatagram(bytes, { host: rinfo.address, port: rinfo.port });
  });
  socket.on("error", (error) => {
    log.limited("udp-error", "discovery socket error", { error: errorMessage(error) });
  });
  await new Promise<void>((resolve, reject) => {
    const onError = (error: Error): void => reject(error);
    socket.once("error", onError);
    socket.bind(bind.port, bind.host, () => {
      socket.off("error", onError);
      resolve();
    });
  });
  for (const set of [() => socket.setRecvBufferSize(RECEIVE_BUFFER_BYTES), () => socket.setSendBufferSize(RECEIVE_BUFFER_BYTES)]) {
    try {
      set();
    } catch {
      // The kernel caps the size (net.core.rmem_max); a smaller buffer only means more retransmissions.
    }
  }
  const bound = socket.address();
  let closed = false;
  return {
    local: { host: bound.address, port: bound.port },
    send(bytes, to) {
      if (closed) return;
      socket.send(bytes, to.port, to.host, (error) => {
        if (error !== null && error !== undefined) {
          log.limited("udp-send", "discovery send failed", { to: `${to.host}:${to.port}`, error: errorMessage(error) });
        }
      });
    },
    close() {
      if (closed) return Promise.resolve();
      closed = true;
      return new Promise<void>((resolve) => socket.close(() => resolve()));
    },
  };
}
