import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";
import { HttpExchangeError, answerJson, httpExchange } from "./http_client.ts";
import { backoffDelayMs, retry } from "./retry.ts";
import { seededRandom } from "./random.ts";

async function serve(handler: Parameters<typeof createServer>[1]): Promise<{ server: Server; url: string }> {
  const server = createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

async function failure(promise: Promise<unknown>): Promise<HttpExchangeError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof HttpExchangeError, `expected HttpExchangeError, got ${String(error)}`);
    return error;
  }
  assert.fail("the exchange succeeded");
}

test("httpExchange sends JSON and reads the whole answer", async (t) => {
  const { server, url } = await serve((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      res.writeHead(201, { "content-type": "application/json" });
      res.end(JSON.stringify({ method: req.method, type: req.headers["content-type"], got: JSON.parse(Buffer.concat(chunks).toString()) }));
    });
  });
  t.after(() => server.close());
  const answer = await httpExchange({ url: `${url}/x`, method: "POST", json: { a: 1 }, timeoutMs: 5000, maxBytes: 1024 });
  assert.equal(answer.status, 201);
  assert.deepEqual(answerJson(answer), { method: "POST", type: "application/json", got: { a: 1 } });
});

test("httpExchange stops reading at maxBytes, declared or streamed", async (t) => {
  let streamedBytes = 0;
  const { server, url } = await serve((req, res) => {
    if (req.url === "/declared") {
      res.writeHead(200, { "content-length": "100000" });
      res.end(Buffer.alloc(100_000));
      return;
    }
    // Chunked, without end: a hostile peer that would stream for ever.
    res.writeHead(200);
    const timer = setInterval(() => {
      streamedBytes += 4096;
      res.write(Buffer.alloc(4096));
    }, 1);
    res.on("close", () => clearInterval(timer));
  });
  t.after(() => server.close());
  const declared = await failure(httpExchange({ url: `${url}/declared`, timeoutMs: 5000, maxBytes: 1000 }));
  assert.equal(declared.failure, "too-large");
  assert.equal(declared.status, 200);
  const streamed = await failure(httpExchange({ url: `${url}/streamed`, timeoutMs: 10_000, maxBytes: 64 * 1024 }));
  assert.equal(streamed.failure, "too-large");
  assert.ok(streamedBytes < 10 * 64 * 1024, `the peer kept streaming: ${streamedBytes} bytes`);
});

test("httpExchange gives up at the deadline and names a refused connection", async (t) => {
  const { server, url } = await serve(() => {
    /* never answers */
  });
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const started = Date.now();
  const timeout = await failure(httpExchange({ url, timeoutMs: 300, maxBytes: 1024 }));
  assert.equal(timeout.failure, "timeout");
  assert.ok(Date.now() - started < 3000);

  const closed = await serve(() => {});
  const closedUrl = closed.url;
  await new Promise((resolve) => closed.server.close(resolve));
  const refused = await failure(httpExchange({ url: closedUrl, timeoutMs: 5000, maxBytes: 1024 }));
  assert.equal(refused.failure, "unreachable");
  assert.equal(refused.errno, "ECONNREFUSED");
});

test("retry: bounded attempts, backoff growing to its cap, non-retryable errors thrown at once", async () => {
  const policy = { initialMs: 100, maxMs: 400, attemptsMax: 4, jitterRatio: 0 };
  assert.deepEqual([0, 1, 2, 3, 4].map((n) => backoffDelayMs(policy, n, Math.random)), [100, 200, 400, 400, 400]);
  const jittered = { ...policy, jitterRatio: 0.2 };
  const random = seededRandom(7);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelayMs(jittered, 0, random);
    assert.ok(d >= 80 && d <= 120, `jittered delay ${d}`);
  }

  const slept: number[] = [];
  const sleep = async (ms: number): Promise<void> => {
    slept.push(ms);
  };
  let calls = 0;
  await assert.rejects(
    retry(async () => {
      calls++;
      throw new Error(`fail ${calls}`);
    }, { policy, retryable: () => true, sleep }),
    /fail 4/,
  );
  assert.equal(calls, 4);
  assert.deepEqual(slept, [100, 200, 400]);

  calls = 0;
  const value = await retry(async (n) => {
    calls++;
    if (n < 3) throw new Error("transient");
    return "ok";
  }, { policy, retryable: () => true, sleep });
  assert.equal(value, "ok");
  assert.equal(calls, 3);

  calls = 0;
  await assert.rejects(retry(async () => {
    calls++;
    throw new Error("final");
  }, { policy, retryable: () => false, sleep }), /final/);
  assert.equal(calls, 1);
});
