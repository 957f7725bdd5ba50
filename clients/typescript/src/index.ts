/**
 * The loraforge resilient client for Node.js: the same contract as `loraforge.client` in Python.
 *
 * An ordered list of routes (endpoint + model + optional prompt shaping), a circuit breaker
 * per route, one deadline per call with per-attempt timeouts inside it, full-jitter retries
 * inside a retry budget, and a real call to the next route when one fails. A 4xx caused by
 * the request itself (not 408/429) is never retried and never falls back: it reaches the
 * caller as RequestRejected. No runtime dependencies: Node's own fetch.
 */

export interface Route {
  name: string;
  baseUrl: string; // the server's root; "/v1/chat/completions" is appended
  model: string;
  apiKey?: string;
  systemPrompt?: string;
  prefix?: string;
  timeoutMs?: number;
}

export interface BreakerConfig {
  failureThreshold: number;
  failureRate: number;
  window: number;
  minCalls: number;
  slowCallMs?: number;
  resetTimeoutMs: number;
  backoff: number;
  maxResetTimeoutMs: number;
  successThreshold: number;
}

export interface RetryPolicy {
  attemptsPerRoute: number;
  baseDelayMs: number;
  maxDelayMs: number;
  budgetRatio: number;
  minRetryTokens: number;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface LLMResponse {
  text: string;
  route: string;
  latencyMs: number;
  tokensUsed: number;
  attempts: number;
  failures: Record<string, string>;
}

export class ClientError extends Error {}

export class RequestRejected extends ClientError {
  constructor(message: string, readonly status: number, readonly route: string, readonly body: unknown) {
    super(message);
  }
}

export class AllRoutesFailed extends ClientError {
  constructor(readonly failures: Record<string, string>) {
    super("every route failed: " + Object.entries(failures).map(([k, v]) => `${k}: ${v}`).join("; "));
  }
}

export class DeadlineExceeded extends ClientError {
  constructor(message: string, readonly failures: Record<string, string>) {
    super(message);
  }
}

export enum State {
  Closed = 0,
  Open = 1,
  HalfOpen = 2,
}

const DEFAULT_BREAKER: BreakerConfig = {
  failureThreshold: 5, failureRate: 0.5, window: 20, minCalls: 10, resetTimeoutMs: 10_000,
  backoff: 2, maxResetTimeoutMs: 300_000, successThreshold: 1,
};
const DEFAULT_RETRY: RetryPolicy = { attemptsPerRoute: 2, baseDelayMs: 50, maxDelayMs: 1000, budgetRatio: 0.2, minRetryTokens: 5 };

/** closed -> open -> half-open (one trial at a time) -> closed; a failed trial re-opens for longer. */
export class CircuitBreaker {
  state = State.Closed;
  private consecutive = 0;
  private outcomes: boolean[] = [];
  private openedAt = 0;
  private resetTimeout: number;
  private trialInFlight = false;
  private trialSuccesses = 0;

  constructor(readonly route: string, readonly cfg: BreakerConfig = DEFAULT_BREAKER, private now: () => number = () => performance.now()) {
    this.resetTimeout = cfg.resetTimeoutMs;
  }

  /** "call" | "trial" | null (skip this route now). Synchronous: no two callers interleave. */
  acquire(): "call" | "trial" | null {
    if (this.state === State.Closed) return "call";
    if (this.state === State.Open) {
      if (this.now() - this.openedAt < this.resetTimeout) return null;
      this.set(State.HalfOpen);
    }
    if (this.trialInFlight) return null;
    this.trialInFlight = true;
    return "trial";
  }

  record(permit: "call" | "trial", ok: boolean, latencyMs?: number): void {
    if (ok && this.cfg.slowCallMs !== undefined && latencyMs !== undefined && latencyMs > this.cfg.slowCallMs) ok = false;
    if (permit === "trial") {
      this.trialInFlight = false;
      if (this.state !== State.HalfOpen) return;
      if (ok) {
        if (++this.trialSuccesses >= this.cfg.successThreshold) this.close();
      } else {
        this.resetTimeout = Math.min(this.resetTimeout * this.cfg.backoff, this.cfg.maxResetTimeoutMs);
        this.open();
      }
      return;
    }
    if (this.state !== State.Closed) return;
    this.outcomes.push(!ok);
    if (this.outcomes.length > this.cfg.window) this.outcomes.shift();
    this.consecutive = ok ? 0 : this.consecutive + 1;
    const failures = this.outcomes.filter(Boolean).length;
    const rateTripped = this.outcomes.length >= this.cfg.minCalls && failures / this.outcomes.length >= this.cfg.failureRate;
    if (this.consecutive >= this.cfg.failureThreshold || rateTripped) this.open();
  }

  release(permit: "call" | "trial"): void {
    if (permit === "trial") this.trialInFlight = false;
  }

  private open(): void {
    this.openedAt = this.now();
    this.trialSuccesses = 0;
    this.set(State.Open);
  }

  private close(): void {
    this.outcomes = [];
    this.consecutive = 0;
    this.resetTimeout = this.cfg.resetTimeoutMs;
    this.set(State.Closed);
  }

  private set(state: State): void {
    if (state === this.state) return;
    const from = State[this.state];
    this.state = state;
    console.info(JSON.stringify({ event: "circuit_state", route: this.route, from, to: State[state], resetTimeoutMs: this.resetTimeout }));
  }
}

class Failure extends Error {
  constructor(readonly why: string, readonly retryAfterMs?: number) {
    super(why);
  }
}

export interface GenerateOptions {
  messages?: ChatMessage[];
  maxTokens?: number;
  temperature?: number;
  deadlineMs?: number;
}

export class LLMClient {
  readonly breakers: Record<string, CircuitBreaker> = {};
  private retryTokens: number;
  private readonly retry: RetryPolicy;

  constructor(readonly routes: Route[], opts: { breaker?: Partial<BreakerConfig>; retry?: Partial<RetryPolicy>; deadlineMs?: number } = {}) {
    if (routes.length === 0) throw new Error("give at least one route");
    this.retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.retryTokens = this.retry.minRetryTokens;
    for (const r of routes) this.breakers[r.name] = new CircuitBreaker(r.name, { ...DEFAULT_BREAKER, ...opts.breaker });
    this.deadlineMs = opts.deadlineMs ?? 30_000;
  }

  private readonly deadlineMs: number;

  async generate(prompt: string | null, opts: GenerateOptions = {}): Promise<LLMResponse> {
    const started = performance.now();
    const deadline = started + (opts.deadlineMs ?? this.deadlineMs);
    this.retryTokens = Math.min(this.retryTokens + this.retry.budgetRatio, this.retry.minRetryTokens + 100);
    const failures: Record<string, string> = {};
    let attempts = 0;
    for (const route of this.routes) {
      const breaker = this.breakers[route.name];
      let permit = breaker.acquire();
      if (permit === null) {
        failures[route.name] = "circuit open";
        continue;
      }
      const payload = {
        model: route.model,
        messages: shape(route, prompt, opts.messages),
        max_tokens: opts.maxTokens ?? 256,
        temperature: opts.temperature ?? 0,
      };
      for (let attempt = 0; attempt < this.retry.attemptsPerRoute; attempt++) {
        const remaining = deadline - performance.now();
        if (remaining <= 0) {
          breaker.release(permit);
          throw new DeadlineExceeded(`deadline passed; tried: ${JSON.stringify(failures)}`, failures);
        }
        attempts++;
        const t0 = performance.now();
        try {
          const body = await this.callRoute(route, payload, Math.min(route.timeoutMs ?? 30_000, remaining));
          breaker.record(permit, true, performance.now() - t0);
          return {
            text: body.choices[0].message.content,
            route: route.name,
            latencyMs: performance.now() - started,
            tokensUsed: body.usage?.total_tokens ?? 0,
            attempts,
            failures,
          };
        } catch (err) {
          if (err instanceof RequestRejected) {
            breaker.release(permit);
            throw err;
          }
          const failure = err as Failure;
          breaker.record(permit, false);
          failures[route.name] = failure.why;
          const last = attempt === this.retry.attemptsPerRoute - 1;
          if (last || breaker.state !== State.Closed || this.retryTokens < 1) break;
          this.retryTokens -= 1;
          const delay = failure.retryAfterMs ?? Math.random() * Math.min(this.retry.maxDelayMs, this.retry.baseDelayMs * 2 ** attempt);
          if (performance.now() + delay >= deadline) break;
          await new Promise((resolve) => setTimeout(resolve, delay));
          const next = breaker.acquire();
          if (next === null) break;
          permit = next;
        }
      }
    }
    if (performance.now() >= deadline) throw new DeadlineExceeded(`deadline passed; tried: ${JSON.stringify(failures)}`, failures);
    throw new AllRoutesFailed(failures);
  }

  private async callRoute(route: Route, payload: object, timeoutMs: number): Promise<any> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (route.apiKey) headers.authorization = `Bearer ${route.apiKey}`;
    let response: Response;
    try {
      response = await fetch(route.baseUrl.replace(/\/$/, "") + "/v1/chat/completions", {
        method: "POST", headers, body: JSON.stringify(payload), signal: AbortSignal.timeout(Math.max(1, Math.floor(timeoutMs))),
      });
    } catch (err) {
      const name = (err as Error).name;
      throw new Failure(name === "TimeoutError" ? `timed out after ${Math.round(timeoutMs)} ms` : `${name}: ${(err as Error).message}`);
    }
    if (response.status === 200) return response.json();
    const text = await response.text();
    if (response.status === 429 || response.status === 408 || response.status >= 500) {
      const retryAfter = Number(response.headers.get("retry-after"));
      throw new Failure(`HTTP ${response.status}`, Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : undefined);
    }
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      /* not JSON: keep the text */
    }
    const message = (body as any)?.error?.message ?? text;
    throw new RequestRejected(`route ${route.name} refused the request: HTTP ${response.status}: ${message}`, response.status, route.name, body);
  }
}

function shape(route: Route, prompt: string | null, messages?: ChatMessage[]): ChatMessage[] {
  const msgs: ChatMessage[] = (messages ?? [{ role: "user", content: prompt ?? "" }]).map((m) => ({ ...m }));
  if (route.prefix) {
    for (let i = msgs.length - 1; i >= 0; i--) {
      if (msgs[i].role === "user") {
        msgs[i].content = route.prefix + msgs[i].content;
        break;
      }
    }
  }
  if (route.systemPrompt && msgs[0]?.role !== "system") msgs.unshift({ role: "system", content: route.systemPrompt });
  return msgs;
}
