// The station's event stream (GET /api/v1/events, Server-Sent Events) read
// with fetch() and a streaming reader: EventSource cannot send the
// Authorization header, and the token must never go into a URL. Reconnects
// (bounded backoff) with Last-Event-ID so no event is missed across a drop.

import { storedToken } from "./api.ts";
import type { StationEvent } from "./types.ts";

export const RECONNECT_MS_MIN = 500;
export const RECONNECT_MS_MAX = 10_000;
/** A frame longer than this is dropped (the station's are a few KiB). */
export const FRAME_CHARS_MAX = 1024 * 1024;

export type StreamState = "connecting" | "live" | "retrying" | "refused";

export interface EventStreamHandlers {
  event(event: StationEvent): void;
  state(state: StreamState, detail: string): void;
}

/** Parses complete SSE frames out of `buffer`; returns the events and what is left. */
export function parseFrames(buffer: string): { events: StationEvent[]; rest: string } {
  const events: StationEvent[] = [];
  const frames = buffer.split(/\r?\n\r?\n/);
  const rest = frames.pop() ?? "";
  for (const frame of frames) {
    const data = frame
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart())
      .join("\n");
    if (data === "") continue; // comments (": heartbeat") and retry: lines
    try {
      events.push(JSON.parse(data) as StationEvent);
    } catch {
      // a frame that is not JSON is not the station's: skip it
    }
  }
  return { events, rest: rest.length > FRAME_CHARS_MAX ? "" : rest };
}

/** Opens the stream until `signal` aborts. */
export function openEventStream(handlers: EventStreamHandlers, signal: AbortSignal): void {
  let lastSeq: number | null = null;
  let delayMs = RECONNECT_MS_MIN;
  const once = async (): Promise<void> => {
    const headers: Record<string, string> = { accept: "text/event-stream" };
    const token = storedToken();
    if (token !== null) headers["authorization"] = `Bearer ${token}`;
    if (lastSeq !== null) headers["last-event-id"] = String(lastSeq);
    handlers.state("connecting", "");
    const response = await fetch("/api/v1/events", { headers, signal });
    if (response.status === 401 || response.status === 403) {
      handlers.state("refused", `the station refused the event stream (${response.status})`);
      return;
    }
    if (!response.ok || response.body === null) throw new Error(`event stream: HTTP ${response.status}`);
    handlers.state("live", "");
    delayMs = RECONNECT_MS_MIN;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += chunk.value;
      const parsed = parseFrames(buffer);
      buffer = parsed.rest;
      for (const event of parsed.events) {
        lastSeq = event.seq;
        handlers.event(event);
      }
    }
    throw new Error("event stream ended");
  };
  const loop = async (): Promise<void> => {
    while (!signal.aborted) {
      try {
        await once();
        return; // refused: signing in again opens a new stream
      } catch (error) {
        if (signal.aborted) return;
        handlers.state("retrying", error instanceof Error ? error.message : String(error));
        await new Promise((resolve) => setTimeout(resolve, delayMs));
        delayMs = Math.min(RECONNECT_MS_MAX, delayMs * 2);
      }
    }
  };
  void loop();
}
