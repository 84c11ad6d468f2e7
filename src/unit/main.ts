// Placeholder until the unit lands (issue 2): replaced by the real `ipsan unit`.
export async function unitMain(_argv: readonly string[]): Promise<number> {
  throw new Error("ipsan unit: not built yet");
}
