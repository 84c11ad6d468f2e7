// A small private network made of Linux network namespaces, for tests that
// must cross a real (virtual) network: one namespace per node plus a "switch"
// namespace holding a bridge; each node gets one veth pair whose switch end is
// a bridge port and whose node end (eth0) has a 10.231.X.Y/24 address. The
// addresses exist ONLY inside these namespaces (nothing is added to the root
// namespace, no route leads anywhere else). destroy() deletes every namespace,
// which removes their veths and bridge with them; call it in a finally block.

import { randomBytes, randomInt } from "node:crypto";
import { describeResult, run } from "../testing/process.ts";

export const NETNS_COMMAND_TIMEOUT_MS = 10_000;

async function ip(args: readonly string[]): Promise<void> {
  const result = await run("ip", args, { timeoutMs: NETNS_COMMAND_TIMEOUT_MS });
  if (result.code !== 0) throw new Error(`network setup failed: ${describeResult(result)}`);
}

export interface NetNode {
  readonly name: string;
  /** The namespace: `ip netns exec ns ...`. */
  readonly ns: string;
  readonly address: string;
  /** Prefix for spawning a command inside the namespace. */
  readonly exec: readonly string[];
}

export class PrivateNetwork {
  readonly id: string;
  readonly subnet: string;
  readonly nodes = new Map<string, NetNode>();
  readonly #namespaces: string[] = [];

  private constructor() {
    this.id = randomBytes(3).toString("hex");
    this.subnet = `10.231.${randomInt(0, 256)}`;
  }

  /** Probes whether this kernel lets us make a namespace (we need root). */
  static async supported(): Promise<{ ok: boolean; why: string }> {
    const probe = `ipsan-probe-${randomBytes(3).toString("hex")}`;
    const add = await run("ip", ["netns", "add", probe], { timeoutMs: NETNS_COMMAND_TIMEOUT_MS });
    if (add.code !== 0) return { ok: false, why: add.stderr.trim() };
    await run("ip", ["netns", "del", probe], { timeoutMs: NETNS_COMMAND_TIMEOUT_MS });
    return { ok: true, why: "" };
  }

  /** Creates the switch and one namespace per node name, addresses .1, .2, ... in that order. */
  static async create(nodeNames: readonly string[]): Promise<PrivateNetwork> {
    const net = new PrivateNetwork();
    try {
      const sw = await net.#namespace("sw");
      await ip(["-n", sw, "link", "add", "br0", "type", "bridge"]);
      await ip(["-n", sw, "link", "set", "br0", "up"]);
      let host = 1;
      for (const name of nodeNames) {
        const ns = await net.#namespace(name);
        const address = `${net.subnet}.${host}`;
        host += 1;
        const port = `v-${name}`.slice(0, 15);
        await ip(["-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        await ip(["-n", sw, "link", "set", port, "master", "br0", "up"]);
        await ip(["-n", ns, "addr", "add", `${address}/24`, "dev", "eth0"]);
        await ip(["-n", ns, "link", "set", "eth0", "up"]);
        net.nodes.set(name, { name, ns, address, exec: ["ip", "netns", "exec", ns] });
      }
    } catch (error) {
      await net.destroy();
      throw error;
    }
    return net;
  }

  async #namespace(role: string): Promise<string> {
    const ns = `ipsan-${this.id}-${role}`;
    await ip(["netns", "add", ns]);
    this.#namespaces.push(ns);
    await ip(["-n", ns, "link", "set", "lo", "up"]);
    return ns;
  }

  node(name: string): NetNode {
    const node = this.nodes.get(name);
    if (node === undefined) throw new Error(`no node ${name}`);
    return node;
  }

  /** Deletes every namespace this network made (their veths and bridge go with them). */
  async destroy(): Promise<void> {
    for (const ns of this.#namespaces.splice(0).reverse()) {
      await run("ip", ["netns", "del", ns], { timeoutMs: NETNS_COMMAND_TIMEOUT_MS });
    }
  }

  static async leftovers(id: string): Promise<string[]> {
    const list = await run("ip", ["netns", "list"], { timeoutMs: NETNS_COMMAND_TIMEOUT_MS });
    return list.stdout.split("\n").filter((line) => line.includes(`ipsan-${id}-`));
  }
}
