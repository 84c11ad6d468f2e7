// Timers of the discovery protocol, in one place, checked against each other
// once, and overridable from the environment so tests can run the real
// programs with short timers (docs/protocol/discovery.md, "Timers").
// Also the retransmission schedule: the project's backoff policy
// (src/util/retry.ts) with discovery's defaults, after which the caller starts over.

import { assert } from "../util/assert.ts";
import { UsageError } from "../util/errors.ts";
import type { Clock, Random, TimerHandle } from "../util/clock.ts";
import { backoffDelayMs, type BackoffPolicy } from "../util/retry.ts";

// The backoff policy is the project's one (src/util/retry.ts); re-exported for discovery's callers.
export { backoffDelayMs, type BackoffPolicy };

export interface LivenessTimers {
  /** How often a unit sends HEARTBEAT (the station tells its units this value in ACKs). */
  readonly heartbeatIntervalMs: number;
  /** Silent this long: the station marks the unit suspect. */
  readonly suspectAfterMs: number;
  /** Silent this long: offline. */
  readonly offlineAfterMs: number;
}

export const DEFAULT_LIVENESS_TIMERS: LivenessTimers = {
  heartbeatIntervalMs: 1000,
  suspectAfterMs: 3000,
  offlineAfterMs: 10_000,
};

export const DEFAULT_BACKOFF: BackoffPolicy = {
  initialMs: 250,
  maxMs: 4000,
  attemptsMax: 6,
  jitterRatio: 0.2,
};

/** How long a stopping unit waits for the station's ACK of SHUTDOWN. */
export const SHUTDOWN_ACK_TIMEOUT_MS = 500;

export const HEARTBEAT_INTERVAL_MS_MIN = 20;
export const HEARTBEAT_INTERVAL_MS_MAX = 60_000;

export const TIMER_ENV = {
  heartbeatIntervalMs: "IPSAN_DISCOVERY_HEARTBEAT_MS",
  suspectAfterMs: "IPSAN_DISCOVERY_SUSPECT_MS",
  offlineAfterMs: "IPSAN_DISCOVERY_OFFLINE_MS",
  retransmitInitialMs: "IPSAN_DISCOVERY_RETRANSMIT_MS",
} as const;

/** Throws UsageError naming the field if the timers do not fit together. */
export function checkLivenessTimers(timers: LivenessTimers): LivenessTimers {
  const { heartbeatIntervalMs, suspectAfterMs, offlineAfterMs } = timers;
  if (!Number.isInteger(heartbeatIntervalMs) || heartbeatIntervalMs < HEARTBEAT_INTERVAL_MS_MIN || heartbeatIntervalMs > HEARTBEAT_INTERVAL_MS_MAX) {
    throw new UsageError(
      `heartbeatIntervalMs: ${heartbeatIntervalMs} is outside ${HEARTBEAT_INTERVAL_MS_MIN}..${HEARTBEAT_INTERVAL_MS_MAX}`,
    );
  }
  if (!Number.isInteger(suspectAfterMs) || suspectAfterMs < 2 * heartbeatIntervalMs) {
    throw new UsageError(`suspectAfterMs: ${suspectAfterMs} must be at least 2 heartbeats (${2 * heartbeatIntervalMs})`);
  }
  if (!Number.isInteger(offlineAfterMs) || offlineAfterMs <= suspectAfterMs) {
    throw new UsageError(`offlineAfterMs: ${offlineAfterMs} must be more than suspectAfterMs (${suspectAfterMs})`);
  }
  return timers;
}

function envInt(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const text = env[name];
  if (text === undefined || text === "") return undefined;
  const value = Number(text);
  if (!Number.isInteger(value) || value <= 0) throw new UsageError(`${name}: invalid milliseconds "${text}"`);
  return value;
}

/** Liveness timers from the environment (TIMER_ENV), defaults otherwise, checked. */
export function livenessTimersFromEnv(env: NodeJS.ProcessEnv = process.env): LivenessTimers {
  const heartbeatIntervalMs = envInt(env, TIMER_ENV.heartbeatIntervalMs) ?? DEFAULT_LIVENESS_TIMERS.heartbeatIntervalMs;
  // Scale the defaults with a shorter heartbeat so setting only the heartbeat stays consistent.
  const scale = heartbeatIntervalMs / DEFAULT_LIVENESS_TIMERS.heartbeatIntervalMs;
  return checkLivenessTimers({
    heartbeatIntervalMs,
    suspectAfterMs: envInt(env, TIMER_ENV.suspectAfterMs) ?? Math.round(DEFAULT_LIVENESS_TIMERS.suspectAfterMs * scale),
    offlineAfterMs: envInt(env, TIMER_ENV.offlineAfterMs) ?? Math.round(DEFAULT_LIVENESS_TIMERS.offlineAfterMs * scale),
  });
}

/** Backoff from the environment (IPSAN_DISCOVERY_RETRANSMIT_MS sets the first delay). */
export function backoffFromEnv(env: NodeJS.ProcessEnv = process.env): BackoffPolicy {
  const initialMs = envInt(env, TIMER_ENV.retransmitInitialMs);
  if (initialMs === undefined) return DEFAULT_BACKOFF;
  return { ...DEFAULT_BACKOFF, initialMs, maxMs: Math.max(initialMs, Math.min(DEFAULT_BACKOFF.maxMs, initialMs * 16)) };
}

/**
 * Sends something until stopped: now, then after backoff delays, at most
 * attemptsMax times per round; when a round is used up it calls onExhausted
 * (the caller decides whether to start over) and stops.
 */
export class Retransmitter {
  private readonly clock: Clock;
  private readonly policy: BackoffPolicy;
  private readonly random: Random;
  private readonly send: (attempt: number) => void;
  private readonly onExhausted: () => void;
  private timer: TimerHandle | null = null;
  private attempt = 0;
  private running = false;

  constructor(options: {
    clock: Clock;
    policy: BackoffPolicy;
    random: Random;
    send: (attempt: number) => void;
    onExhausted: () => void;
  }) {
    assert(options.policy.attemptsMax >= 1 && options.policy.initialMs >= 1, "backoff policy");
    this.clock = options.clock;
    this.policy = options.policy;
    this.random = options.random;
    this.send = options.send;
    this.onExhausted = options.onExhausted;
  }

  get active(): boolean {
    return this.running;
  }

  /** Number of sends so far in this round. */
  get attempts(): number {
    return this.attempt;
  }

  start(): void {
    this.stop();
    this.running = true;
    this.attempt = 0;
    this.fire();
  }

  /** Sends again now (the peer asked), keeping the round's count. */
  nudge(): void {
    if (!this.running) return;
    this.timer?.cancel();
    this.fire();
  }

  stop(): void {
    this.running = false;
    this.timer?.cancel();
    this.timer = null;
  }

  private fire(): void {
    if (this.attempt >= this.policy.attemptsMax) {
      this.stop();
      this.onExhausted();
      return;
    }
    const attempt = this.attempt++;
    this.send(attempt);
    if (!this.running) return; // send() may have stopped us
    this.timer = this.clock.setTimeout(() => this.fire(), backoffDelayMs(this.policy, attempt, this.random));
  }
}
