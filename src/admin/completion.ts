// `ipsan completion bash|zsh`: shell completion (issue 9). Commands and
// subcommands come from the table below; a command's flags come from the
// command itself at completion time (`ipsan CMD SUB --help` prints them under
// "flags:"), so the completion never drifts from the flags the code parses.

import { UsageError } from "../util/errors.ts";

/** Subcommands of the commands that have them (the top-level commands are the CLI's own table). */
export const SUBCOMMANDS: Readonly<Record<string, readonly string[]>> = {
  unit: ["volume", "format"],
  host: ["register", "request", "attach", "detach", "release", "agent", "list", "engine"],
  units: ["identity", "rotate-secret", "forget"],
  hosts: ["register", "token", "rotate-key"],
  volume: ["create", "delete", "grow", "partition", "wipe"],
  tokens: ["create", "list", "revoke"],
  audit: ["verify", "list"],
  tasks: ["show", "cancel", "wait"],
  station: ["rotate-cluster-key", "backup", "restore"],
  completion: ["bash", "zsh"],
};

function bashScript(commands: readonly string[]): string {
  const cases = Object.entries(SUBCOMMANDS)
    .map(([command, subs]) => `    ${command}) subs="${subs.join(" ")}" ;;`)
    .join("\n");
  return `# bash completion for ipsan: source <(ipsan completion bash)
_ipsan() {
  local cur="\${COMP_WORDS[COMP_CWORD]}"
  local words=() i
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "\${COMP_WORDS[i]}" in -*) break ;; *) words+=("\${COMP_WORDS[i]}") ;; esac
  done
  if [ "\${#words[@]}" -eq 0 ]; then
    COMPREPLY=($(compgen -W "${commands.join(" ")} --version --help" -- "$cur"))
    return
  fi
  if [[ "$cur" == -* ]]; then
    local flags
    flags=$("\${COMP_WORDS[0]}" "\${words[@]}" --help 2>/dev/null | sed -n 's/^  \\(--[a-z0-9-]*\\).*/\\1/p')
    COMPREPLY=($(compgen -W "$flags --help --config --log-format" -- "$cur"))
    return
  fi
  local subs=""
  if [ "\${#words[@]}" -eq 1 ]; then
    case "\${words[0]}" in
${cases}
    esac
  fi
  if [ -n "$subs" ]; then COMPREPLY=($(compgen -W "$subs" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi
}
complete -F _ipsan ipsan
`;
}

function zshScript(commands: readonly string[]): string {
  return `#compdef ipsan
# zsh completion for ipsan: source <(ipsan completion zsh)  (uses bash's completion through bashcompinit)
(( $+functions[compdef] )) || { autoload -U +X compinit && compinit -u; }
autoload -U +X bashcompinit && bashcompinit
${bashScript(commands)}`;
}

/** Prints the completion script for the shell named in argv. */
export async function completionMain(argv: readonly string[], commands: readonly string[]): Promise<number> {
  const shell = argv[0];
  const all = [...commands, "completion"].sort();
  if (shell === "bash") process.stdout.write(bashScript(all));
  else if (shell === "zsh") process.stdout.write(zshScript(all));
  else throw new UsageError(`completion: expected bash or zsh, got ${shell === undefined ? "nothing" : `"${shell}"`}\nusage: ipsan completion bash|zsh   (e.g. source <(ipsan completion bash))`);
  return 0;
}
