// The project's one seeded random generator, for simulations, property-style
// tests and jitter that a seed must be able to replay.

/** Random numbers in [0, 1); injectable so a seed replays a run. */
export type Random = () => number;

/** A small seeded generator (mulberry32). */
export function seededRandom(seed: number): Random {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
