// The console's one way to call the station: the public REST API with the
// bearer token from sessionStorage (never a URL, never localStorage), JSON in
// and out, errors as ApiError carrying the API's {code, message, field}.

const TOKEN_KEY = "ipsan.token";
/** A request that takes longer than this is aborted (the station answers in ms; a task answers 202 at once). */
export const REQUEST_TIMEOUT_MS = 15_000;

export function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}
export function storeToken(token: string | null): void {
  if (token === null) sessionStorage.removeItem(TOKEN_KEY);
  else sessionStorage.setItem(TOKEN_KEY, token);
}

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly field: string | undefined;
  readonly body: unknown;
  constructor(status: number, code: string, message: string, field: string | undefined, body: unknown) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
    this.body = body;
  }
}

export interface ApiAnswer<T> {
  readonly status: number;
  readonly body: T;
  readonly headers: Headers;
}

export interface CallOptions {
  readonly body?: unknown;
  /** Prefer: respond-async: a task answers 202 with its view at once (contract, issue 8). */
  readonly async?: boolean;
  readonly signal?: AbortSignal;
  /** Answer these statuses instead of throwing (e.g. 404 for a route an older station lacks). */
  readonly accept?: readonly number[];
}

/** Calls METHOD PATH; throws ApiError for a status >= 400 unless `accept` lists it. */
export async function call<T = unknown>(method: string, path: string, options: CallOptions = {}): Promise<ApiAnswer<T>> {
  const headers: Record<string, string> = { accept: "application/json" };
  const token = storedToken();
  if (token !== null) headers["authorization"] = `Bearer ${token}`;
  if (options.body !== undefined) headers["content-type"] = "application/json";
  if (options.async === true) headers["prefer"] = "respond-async";
  const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_MS);
  const signal = options.signal === undefined ? timeout : AbortSignal.any([timeout, options.signal]);
  const init: RequestInit = { method, headers, signal };
  if (options.body !== undefined) init.body = JSON.stringify(options.body);
  const response = await fetch(path, init);
  const text = await response.text();
  let body: unknown = null;
  if (text !== "") {
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
  }
  if (response.status >= 400 && !(options.accept ?? []).includes(response.status)) {
    const error = (body as { error?: { code?: string; message?: string; field?: string } } | null)?.error;
    throw new ApiError(response.status, error?.code ?? `HTTP_${response.status}`, error?.message ?? `${method} ${path}: HTTP ${response.status}`, error?.field, body);
  }
  return { status: response.status, body: body as T, headers: response.headers };
}

export async function get<T>(path: string, signal?: AbortSignal): Promise<T> {
  return (await call<T>("GET", path, signal === undefined ? {} : { signal })).body;
}

/** "u1/v1" -> "/u1/v1" with each name percent-encoded. */
export function seg(...names: readonly string[]): string {
  return names.map((n) => `/${encodeURIComponent(n)}`).join("");
}

/** The message to show for a failure: the station's own words, with the field it names. */
export function describeError(error: unknown): string {
  if (error instanceof ApiError) return `${error.status} ${error.code}: ${error.message}${error.field === undefined ? "" : ` (field ${error.field})`}`;
  if (error instanceof Error) return error.message;
  return String(error);
}
