// The console's shell: sign-in (token kept in sessionStorage only), then the
// navigation ("Pool", "Units", "Volumes", "Hosts", "Tasks", "Events": their
// accessible names are a contract, docs/console.md) and the page of the
// location hash (#/units, #/units/NAME, ...; no token ever goes in a URL).

import type { JSX } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { ApiError, describeError, get, storeToken, storedToken } from "./api.ts";
import { Model, canWrite, useModel } from "./model.ts";
import type { Who } from "./types.ts";
import { READ_ONLY_NOTE_ID } from "./ui.tsx";
import { PoolPage } from "./pages/pool.tsx";
import { UnitsPage, UnitPage } from "./pages/units.tsx";
import { VolumesPage } from "./pages/volumes.tsx";
import { HostsPage } from "./pages/hosts.tsx";
import { TasksPage } from "./pages/tasks.tsx";
import { EventsPage } from "./pages/events.tsx";

export const PAGES = [
  { path: "pool", label: "Pool" },
  { path: "units", label: "Units" },
  { path: "volumes", label: "Volumes" },
  { path: "hosts", label: "Hosts" },
  { path: "tasks", label: "Tasks" },
  { path: "events", label: "Events" },
] as const;

function currentRoute(): string[] {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p !== "").map((p) => decodeURIComponent(p));
  return parts.length === 0 ? ["pool"] : parts;
}

function useRoute(): string[] {
  const [route, setRoute] = useState(currentRoute);
  useEffect(() => {
    const onHash = (): void => setRoute(currentRoute());
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  return route;
}

/** GET /api/v1/whoami; a station without it: role unknown (actions enabled, the station decides). */
async function whoAmI(): Promise<Who> {
  try {
    return await get<Who>("/api/v1/whoami");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      await get("/api/v1/health"); // still proves the token
      return { name: "?", role: "unknown", host: null };
    }
    throw error;
  }
}

export function App(): JSX.Element {
  const [who, setWho] = useState<Who | null>(null);
  const [checking, setChecking] = useState(storedToken() !== null);
  const [error, setError] = useState<string | null>(null);

  const signIn = async (token: string): Promise<void> => {
    storeToken(token);
    setChecking(true);
    setError(null);
    try {
      setWho(await whoAmI());
    } catch (e) {
      storeToken(null);
      setError(e instanceof ApiError && e.status === 401 ? "The station did not accept this token." : `Cannot sign in: ${describeError(e)}`);
    } finally {
      setChecking(false);
    }
  };
  useEffect(() => {
    const token = storedToken();
    if (token !== null) void signIn(token);
  }, []);
  const signOut = (): void => {
    storeToken(null);
    setWho(null);
  };
  if (who === null) return <SignIn onSignIn={(t) => void signIn(t)} checking={checking} error={error} />;
  return <Console who={who} onSignOut={signOut} />;
}

function SignIn(props: { onSignIn: (token: string) => void; checking: boolean; error: string | null }): JSX.Element {
  const [token, setToken] = useState("");
  return (
    <main class="signin">
      <h1>ipsan console</h1>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (token.trim() !== "") props.onSignIn(token.trim());
        }}
      >
        <label for="token">Token</label>
        <input id="token" name="token" type="password" autocomplete="off" value={token} onInput={(e) => setToken(e.currentTarget.value)} required />
        <p class="hint">The station's DATA/admin.token, or a token from <code>ipsan tokens create</code>. It is kept for this browser tab only.</p>
        <button type="submit" class="btn btn-primary" disabled={props.checking}>
          Sign in
        </button>
        {props.error === null ? null : (
          <p class="status status-error" role="alert">
            {props.error}
          </p>
        )}
      </form>
    </main>
  );
}

function Console(props: { who: Who; onSignOut: () => void }): JSX.Element {
  const model = useMemo(() => new Model(), [props.who]);
  const state = useModel(model);
  const route = useRoute();
  const [loadError, setLoadError] = useState<string | null>(null);
  useEffect(() => {
    model.start(props.who).catch((e: unknown) => setLoadError(describeError(e)));
    return () => model.stop();
  }, [model]);
  const writable = canWrite(props.who);
  const denied = writable ? null : `Your role (${props.who.role}, token ${props.who.name}) may look but not change anything`;
  const page = route[0] ?? "pool";
  let content: JSX.Element;
  switch (page) {
    case "units":
      content = route[1] === undefined ? <UnitsPage model={model} /> : <UnitPage model={model} name={route[1]} />;
      break;
    case "volumes":
      content = <VolumesPage model={model} denied={denied} />;
      break;
    case "hosts":
      content = <HostsPage model={model} />;
      break;
    case "tasks":
      content = <TasksPage model={model} denied={denied} />;
      break;
    case "events":
      content = <EventsPage model={model} />;
      break;
    default:
      content = <PoolPage model={model} />;
  }
  return (
    <div class="shell">
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header class="top">
        <span class="brand">ipsan</span>
        <nav aria-label="Pages">
          <ul>
            {PAGES.map((p) => (
              <li key={p.path}>
                <a href={`#/${p.path}`} aria-current={page === p.path ? "page" : undefined}>
                  {p.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <div class="who">
          <span class={`live live-${state.stream.state}`} title={state.stream.detail} role="status">
            {state.stream.state === "live" ? "live" : state.stream.state}
          </span>
          <span>
            {props.who.name} ({props.who.role})
          </span>
          <button type="button" class="btn" onClick={props.onSignOut}>
            Sign out
          </button>
        </div>
      </header>
      {denied === null ? null : (
        <p id={READ_ONLY_NOTE_ID} class="note">
          Read-only: {denied}.
        </p>
      )}
      {loadError === null && state.error === null ? null : (
        <p class="status status-error" role="alert">
          {loadError ?? state.error}
        </p>
      )}
      <main id="main" tabIndex={-1}>
        {content}
      </main>
    </div>
  );
}
