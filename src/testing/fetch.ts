// fetch() for tests, with a deadline that keeps the event loop alive.
//
// AbortSignal.timeout() uses an unref'd timer: when a daemon under test is
// killed mid-answer and undici leaves the request hanging, nothing else holds
// the loop, node:test sees it empty and fails the file with "Promise
// resolution is still pending". A ref'd timer turns that into a clear
// timeout error instead.

export async function fetchText(
  url: string,
  init: RequestInit,
  timeoutMs: number,
): Promise<{ response: Response; text: string }> {
  const abort = new AbortController();
  const timer = setTimeout(
    () => abort.abort(new Error(`${init.method ?? "GET"} ${url} timed out after ${timeoutMs} ms`)),
    timeoutMs,
  );
  try {
    const response = await fetch(url, { ...init, signal: abort.signal });
    return { response, text: await response.text() };
  } finally {
    clearTimeout(timer);
  }
}
