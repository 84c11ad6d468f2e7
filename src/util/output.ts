// What the CLI prints with --json: one JSON document on stdout. Every listing
// has one shape, {"items": [...]}, the API's List shape (docs/cli.md "--json";
// issue 9 item 11: `ipsan hosts --json` used to print a bare array while
// `ipsan host list --json` printed {"items": ...}).

/** A JSON document on stdout, indented, ending in a newline. */
export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** A listing with --json: {"items": [...]}. */
export function printItems(items: readonly unknown[]): void {
  printJson({ items });
}
