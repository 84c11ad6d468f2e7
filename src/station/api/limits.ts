// The station API's limits (docs/api.md "Limits"): one place, imported by the
// server, the routes and the tests.

export const BODY_BYTES_MAX = 64 * 1024;
/** After a 413, bytes read and discarded before the connection is cut. */
export const BODY_DRAIN_BYTES_MAX = 1024 * 1024;
export const HTTP_CONNECTIONS_MAX = 1024;
export const HTTP_HEADERS_TIMEOUT_MS = 10_000;
export const HTTP_REQUEST_TIMEOUT_MS = 30_000;
export const HTTP_KEEP_ALIVE_TIMEOUT_MS = 5_000;
export const SSE_SUBSCRIBERS_MAX = 64;
export const SSE_HEARTBEAT_MS = 15_000;
/** A subscriber with more than this waiting in its socket buffer is disconnected. */
export const SSE_BUFFER_BYTES_MAX = 1024 * 1024;
export const VERSION = "0.1.0";
/** Items per listing page unless ?limit= says otherwise, and the most it may say. */
export const LIST_LIMIT_DEFAULT = 10_000;
export const LIST_LIMIT_MAX = 100_000;
/** Largest console file served (the console's bundle is far smaller). */
export const CONSOLE_FILE_BYTES_MAX = 16 * 1024 * 1024;
