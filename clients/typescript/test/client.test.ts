// The TypeScript client against real `loraforge serve` processes (tiny model) on loopback.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { CircuitBreaker, DeadlineExceeded, LLMClient, RequestRejected, State } from "../src/index.js";

const PYTHON = process.env.LORAFORGE_PYTHON ?? path.resolve("../../.venv/bin/python");
const work = mkdtempSync(path.join(tmpdir(), "loraforge-ts-"));
const modelDir = path.join(work, "tiny");
const servers: ChildProcess[] = [];

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function startServer(): Promise<{ url: string; proc: ChildProcess }> {
  const port = await freePort();
  const proc = spawn(PYTHON, ["-m", "loraforge.cli", "serve", "--model", modelDir, "--port", String(port)], { stdio: "ignore" });
  servers.push(proc);
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    try {
      if ((await fetch(url + "/ready")).status === 200) return { url, proc };
    } catch {
      /* not listening yet */
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error("server not ready");
}

let primary: { url: string; proc: ChildProcess };
let fallback: { url: string; proc: ChildProcess };

before(async () => {
  const built = spawnSync(PYTHON, ["-c", `from loraforge.models import build_tiny_llama; build_tiny_llama(${JSON.stringify(modelDir)})`]);
  assert.equal(built.status, 0, String(built.stderr));
  [primary, fallback] = await Promise.all([startServer(), startServer()]);
});

after(() => {
  for (const s of servers) s.kill("SIGKILL");
});

test("the primary answers, with the response fields of the Python client", async () => {
  const client = new LLMClient([{ name: "lora", baseUrl: primary.url, model: "base" }]);
  const answer = await client.generate("Order: one mug.", { maxTokens: 4 });
  assert.equal(answer.route, "lora");
  assert.equal(typeof answer.text, "string");
  assert.ok(answer.tokensUsed > 0 && answer.attempts === 1 && answer.latencyMs > 0);
});

test("a request the server rejects (400) is not retried and does not fall back", async () => {
  const client = new LLMClient([
    { name: "lora", baseUrl: primary.url, model: "base" },
    { name: "base-fallback", baseUrl: fallback.url, model: "base" },
  ]);
  await assert.rejects(client.generate("x", { maxTokens: 1_000_000 }), (err: unknown) => err instanceof RequestRejected && err.status === 400 && err.route === "lora");
  assert.equal(client.breakers.lora.state, State.Closed);
});

test("the deadline holds when every route hangs", async () => {
  const sockets: net.Socket[] = [];
  const hang = net.createServer((socket) => void sockets.push(socket)).listen(0, "127.0.0.1");
  await new Promise((r) => hang.once("listening", r));
  const url = `http://127.0.0.1:${(hang.address() as net.AddressInfo).port}`;
  const client = new LLMClient([{ name: "a", baseUrl: url, model: "m" }, { name: "b", baseUrl: url, model: "m" }], { deadlineMs: 800 });
  const started = performance.now();
  await assert.rejects(client.generate("hi"), DeadlineExceeded);
  assert.ok(performance.now() - started < 1500);
  for (const socket of sockets) socket.destroy();
  hang.close();
});

test("half-open lets exactly one trial through under 50 concurrent callers", () => {
  let now = 0;
  const breaker = new CircuitBreaker("r", { failureThreshold: 1, failureRate: 1, window: 10, minCalls: 10, resetTimeoutMs: 100, backoff: 2, maxResetTimeoutMs: 1000, successThreshold: 1 }, () => now);
  breaker.record(breaker.acquire()!, false);
  now = 200;
  const permits = Array.from({ length: 50 }, () => breaker.acquire());
  assert.equal(permits.filter((p) => p === "trial").length, 1);
  assert.equal(permits.filter((p) => p === null).length, 49);
});

test("primary killed with SIGKILL: the fallback answers within the deadline, the breaker opens", async () => {
  const client = new LLMClient(
    [
      { name: "lora", baseUrl: primary.url, model: "base", timeoutMs: 5000 },
      { name: "base-fallback", baseUrl: fallback.url, model: "base", systemPrompt: "Answer briefly.", timeoutMs: 5000 },
    ],
    { breaker: { failureThreshold: 2, resetTimeoutMs: 60_000 }, retry: { attemptsPerRoute: 1 }, deadlineMs: 10_000 },
  );
  assert.equal((await client.generate("hi", { maxTokens: 2 })).route, "lora");
  primary.proc.kill("SIGKILL");
  await new Promise((r) => primary.proc.once("exit", r));
  for (let i = 0; i < 3; i++) {
    const answer = await client.generate("hi", { maxTokens: 2 });
    assert.equal(answer.route, "base-fallback");
  }
  assert.equal(client.breakers.lora.state, State.Open);
});
