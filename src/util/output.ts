// What the CLI prints with --json: one JSON document on stdout. Every listing
// has one shape, {"items": [...]}, the API's List shape (docs/cli.md "--json";
// issue 9 item 11: `ipsan hosts --json` used to print a bare array while
// `ipsan host list --json` printed {"items": ...}).

/** A JSON document on stdout, indented, ending in a newline. */
export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/**
 * The old shape of the listings that printed a bare array before 0.1.0's
 * {"items": ...} (CHANGELOG.md): IPSAN_JSON_LISTS=array keeps it, for scripts
 * not yet moved to `.items`. Deprecated; one release.
 */
export const JSON_LISTS_ENV = "IPSAN_JSON_LISTS";

/** A listing with --json: {"items": [...]} (a bare array with IPSAN_JSON_LISTS=array, the old shape). */
export function printItems(items: readonly unknown[]): void {
  printJson(process.env[JSON_LISTS_ENV] === "array" ? items : { items });
}
