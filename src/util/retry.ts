// The project's one retry/backoff policy: exponential delays with jitter and a
// bounded number of attempts. Discovery's retransmissions (src/discovery/timers.ts
// Retransmitter), the station's calls to units (src/station/unit_client.ts) and
// anything else that tries again use these two functions, so "how ipsan retries"
// has one answer: docs/ARCHITECTURE.md "Retries".

import { assert } from "./assert.ts";
import type { Random } from "./random.ts";

export interface BackoffPolicy {
  readonly initialMs: number;
  readonly maxMs: number;
  /** Attempts per round, the first included; then the caller gives up or starts over. */
  readonly attemptsMax: number;
  /** Each delay is scaled by a random factor in [1 - jitterRatio, 1 + jitterRatio]. */
  readonly jitterRatio: number;
}

/** Delay before attempt number `attempt + 1` (attempt 0 is the first): initialMs * 2^attempt, capped at maxMs, jittered. */
export function backoffDelayMs(policy: BackoffPolicy, attempt: number, random: Random): number {
  const base = Math.min(policy.maxMs, policy.initialMs * 2 ** Math.min(attempt, 30));
  const factor = 1 - policy.jitterRatio + 2 * policy.jitterRatio * random();
  return Math.max(1, Math.round(base * factor));
}

export interface RetryOptions {
  readonly policy: BackoffPolicy;
  /** Whether a failure of attempt `attempt` (1-based) is worth another try; the last attempt's error is thrown as is. */
  readonly retryable: (error: unknown, attempt: number) => boolean;
  /** Default: Math.random. */
  readonly random?: Random;
  /** Default: a ref'd setTimeout (a waiting CLI stays alive until the retry). */
  readonly sleep?: (ms: number) => Promise<void>;
  /** Called before each wait (logging). */
  readonly onRetry?: (error: unknown, attempt: number, delayMs: number) => void;
}

const realSleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs `attempt` until it succeeds, a failure is not retryable, or policy.attemptsMax attempts are used. */
export async function retry<T>(attempt: (attemptNumber: number) => Promise<T>, options: RetryOptions): Promise<T> {
  const { policy } = options;
  assert(Number.isInteger(policy.attemptsMax) && policy.attemptsMax >= 1, "retry: attemptsMax must be a whole number >= 1");
  const random = options.random ?? Math.random;
  const sleep = options.sleep ?? realSleep;
  for (let n = 1; ; n++) {
    try {
      return await attempt(n);
    } catch (error) {
      if (n >= policy.attemptsMax || !options.retryable(error, n)) throw error;
      const delayMs = backoffDelayMs(policy, n - 1, random);
      options.onRetry?.(error, n, delayMs);
      await sleep(delayMs);
    }
  }
}
