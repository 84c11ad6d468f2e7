// `ipsan completion bash|zsh` (issue 9): the scripts complete commands,
// subcommands and each command's own flags (read from its --help), in a real
// bash, and load in a real zsh.

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { test } from "node:test";
import { run, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";

test("bash: commands, subcommands and flags complete; zsh loads the script and registers it", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("completion");
  try {
    const bashScript = dir.file("ipsan.bash");
    writeFileSync(bashScript, (await runOk(process.execPath, [IPSAN_BIN, "completion", "bash"])).stdout);
    // The completion runs the program as COMP_WORDS[0]: a wrapper that is bin/ipsan.
    const wrapper = dir.file("ipsan");
    writeFileSync(wrapper, `#!/bin/sh\nexec "${process.execPath}" "${IPSAN_BIN}" "$@"\n`, { mode: 0o755 });
    const complete = async (...words: string[]): Promise<string[]> => {
      const line = [wrapper, ...words].map((w) => `'${w}'`).join(" ");
      const result = await runOk("bash", ["-c", `source '${bashScript}'; COMP_WORDS=(${line}); COMP_CWORD=${words.length}; _ipsan; printf '%s\\n' "\${COMPREPLY[@]}"`]);
      return result.stdout.split("\n").filter((w) => w !== "");
    };
    assert.deepEqual(await complete("ho"), ["host", "hosts"]);
    assert.deepEqual(await complete("host", "re"), ["register", "request", "release"]);
    assert.deepEqual(await complete("host", "request", "--st"), ["--state-dir", "--station"]);
    assert.ok((await complete("unit", "--ca")).includes("--capacity"));
    assert.ok((await complete("")).includes("completion"));

    const zsh = await run("zsh", ["-c", `source <('${process.execPath}' '${IPSAN_BIN}' completion zsh) && (( $+_comps[ipsan] )) && echo registered`]);
    assert.equal(zsh.code, 0, zsh.stderr);
    assert.match(zsh.stdout, /registered/);

    const bad = await run(process.execPath, [IPSAN_BIN, "completion", "fish"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /expected bash or zsh, got "fish"/);
  } finally {
    dir.remove();
  }
});
