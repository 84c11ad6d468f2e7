// Proves where a replacement leg goes (placeReplacement, src/station/replacement.ts),
// a pure function over the pool as the allocator sees it:
// - a spare in a failure domain the mirror's remaining legs do not use first,
//   then any spare, then a non-spare with room in a new domain, then any unit
//   with room;
// - never a unit that holds a leg of this mirror (the remaining legs' units,
//   and the failed leg's own unit), even when it alone has room: then no
//   placement, with the reason for every unit.
// The checks are in replacement_checks.ts: the canary (leg_replacement_canary_test.ts)
// runs the same checks against a broken compiled copy, where they must fail.

import { test } from "node:test";
import { placeReplacement } from "./replacement.ts";
import { checkPlacement } from "./replacement_checks.ts";

test("a replacement leg goes to a spare in a new zone first, never to a unit of the mirror", () => {
  checkPlacement(placeReplacement);
});
