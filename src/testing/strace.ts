// Reading what `strace -f -tt -T -yy -xx -o FILE` wrote: one record per
// system call, with the line where strace reported its entry and the line
// where it reported its return. With -f, strace writes events in the order it
// sees them; a call that another thread's event interrupts is split into
// `NAME(args <unfinished ...>` and, later, `<... NAME resumed>rest) = RET`,
// which are joined here by pid. Line numbers order events causally: a thread
// stopped at a syscall's return cannot run on (and wake another thread) until
// strace has reported that return, so "returned at line 10, the other call
// entered at line 12" means the return happened first.
//
// -xx prints every byte of a string as \xNN, also the fd annotations of -y
// (`19<\x2f\x74...>` is fd 19 on /t...), so a string never contains a raw
// quote, comma or bracket and the arguments split cleanly.
//
// Times: -tt prints HH:MM:SS.micros; `--absolute-timestamps=format:unix,precision:ns`
// (TraceOptions.timestamps "unix-ns") prints seconds since the epoch with
// nanoseconds, which compare across the logs of several strace processes on
// one machine (they all read the same CLOCK_REALTIME). strace takes a line's
// time when it handles the event, with the thread stopped: a call's entry
// time is before the kernel ran it, and a line's time is later than the
// return of every call whose return is reported above it. A call printed
// whole on one line carries its ENTRY time; returnedByNs() gives a time by
// which it had returned.

/** One system call as strace reported it. */
export interface Syscall {
  readonly pid: number;
  readonly name: string;
  /** 0-based line of the trace where the call entered (its full line if not split). */
  readonly entryLine: number;
  /** 0-based line where it returned (the `resumed` line if split). */
  readonly exitLine: number;
  /** The times of those lines as printed: -tt wall clock (HH:MM:SS.micros) or unix seconds (SECONDS.nanos). */
  readonly entryTime: string;
  readonly exitTime: string;
  /** Top-level arguments as printed (strings still escaped), entry and resumed parts joined. */
  readonly args: readonly string[];
  /** What follows "= " (e.g. "4096", "-1 EAGAIN (Resource temporarily unavailable)", "?"), without the -T time. */
  readonly result: string;
  /** The numeric return value, undefined for "?". */
  readonly ret: number | undefined;
  /** The first argument as an fd, when it is one. */
  readonly fd: number | undefined;
  /** What -y/-yy said the fd is (a path, or e.g. "TCP:[127.0.0.1:4000->127.0.0.1:5000]"). */
  readonly fdPath: string | undefined;
}

export interface StraceLog {
  readonly syscalls: readonly Syscall[];
  /** Lines that are neither a call, a signal nor an exit notice (for failure messages). */
  readonly unparsed: readonly string[];
  /** The raw lines, indexed as entryLine/exitLine count them. */
  readonly lines: readonly string[];
}

const LINE = /^(\d+)\s+(\d\d:\d\d:\d\d\.\d+|\d+\.\d+)\s+(.*)$/;
const RESUMED = /^<\.\.\. (\w+) resumed>(.*)$/;
const UNFINISHED = /^(\w+)\((.*)<unfinished \.\.\.>$/;
const CALL = /^(\w+)\((.*)$/;
const DURATION = /\s+<\d+\.\d+>$/;

/** Decodes the inside of a strace string literal (\xNN, \NNN, \n, \t, \\, \", ...). */
export function decodeStraceString(text: string): Buffer {
  const out: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c !== 0x5c) {
      out.push(c & 0xff);
      continue;
    }
    const next = text[i + 1] ?? "";
    if (next === "x") {
      out.push(parseInt(text.slice(i + 2, i + 4), 16));
      i += 3;
    } else if (/[0-7]/.test(next)) {
      const octal = /^[0-7]{1,3}/.exec(text.slice(i + 1))?.[0] ?? "0";
      out.push(parseInt(octal, 8) & 0xff);
      i += octal.length;
    } else {
      const simple: Record<string, number> = { n: 10, t: 9, r: 13, v: 11, f: 12, a: 7, b: 8, "\\": 0x5c, '"': 0x22 };
      out.push(simple[next] ?? next.charCodeAt(0));
      i += 1;
    }
  }
  return Buffer.from(out);
}

/** Every string literal in an argument text, decoded (truncated ones hold only the printed bytes). */
export function stringsIn(text: string): Buffer[] {
  const out: Buffer[] = [];
  for (const match of text.matchAll(/"((?:[^"\\]|\\.)*)"/g)) out.push(decodeStraceString(match[1] ?? ""));
  return out;
}

/** Splits an argument list at top-level commas (not inside strings, [], {} or ()). */
export function splitArgs(text: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let inString = false;
  let start = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i += 1;
      else if (c === '"') inString = false;
      continue;
    }
    if (c === '"') inString = true;
    else if (c === "[" || c === "{" || c === "(") depth += 1;
    else if (c === "]" || c === "}" || c === ")") depth -= 1;
    else if (c === "," && depth === 0) {
      out.push(text.slice(start, i).trim());
      start = i + 1;
    }
  }
  const last = text.slice(start).trim();
  if (last !== "" || out.length > 0) out.push(last);
  return out;
}

/** `19<\x2f\x74\x6d\x70>` -> {fd: 19, path: "/tmp"}; undefined when the argument is not an fd. */
export function parseFdArg(arg: string | undefined): { fd: number; path: string | undefined } | undefined {
  const match = /^(\d+)(?:<(.*)>)?$/.exec(arg ?? "");
  if (match === null) return undefined;
  return { fd: Number(match[1]), path: match[2] === undefined ? undefined : decodeStraceString(match[2]).toString("latin1") };
}

interface Pending {
  name: string;
  argsText: string;
  line: number;
  time: string;
}

function finish(pid: number, name: string, argsAndResult: string, entry: { line: number; time: string }, exit: { line: number; time: string }): Syscall | undefined {
  const cut = argsAndResult.lastIndexOf(") = ");
  if (cut < 0) return undefined;
  const args = splitArgs(argsAndResult.slice(0, cut));
  const result = argsAndResult.slice(cut + 4).replace(DURATION, "");
  const number = /^-?\d+/.exec(result);
  const fd = parseFdArg(args[0]);
  return {
    pid,
    name,
    entryLine: entry.line,
    exitLine: exit.line,
    entryTime: entry.time,
    exitTime: exit.time,
    args,
    result,
    ret: number === null ? undefined : Number(number[0]),
    fd: fd?.fd,
    fdPath: fd?.path,
  };
}

/** Parses a whole `strace -f -tt -o FILE` log (lines `PID HH:MM:SS.micros EVENT`, or `PID SECONDS.nanos EVENT`). */
export function parseStraceLog(text: string): StraceLog {
  const lines = text.split("\n");
  const syscalls: Syscall[] = [];
  const unparsed: string[] = [];
  const pending = new Map<number, Pending>();
  lines.forEach((line, index) => {
    if (line.trim() === "") return;
    const match = LINE.exec(line);
    if (match === null) {
      unparsed.push(line);
      return;
    }
    const pid = Number(match[1]);
    const time = match[2] ?? "";
    const rest = match[3] ?? "";
    if (rest.startsWith("---") || rest.startsWith("+++")) return;
    const resumed = RESUMED.exec(rest);
    if (resumed !== null) {
      const started = pending.get(pid);
      pending.delete(pid);
      const call = started !== undefined && started.name === resumed[1] ? finish(pid, started.name, started.argsText + (resumed[2] ?? ""), started, { line: index, time }) : undefined;
      if (call === undefined) unparsed.push(line);
      else syscalls.push(call);
      return;
    }
    const unfinished = UNFINISHED.exec(rest);
    if (unfinished !== null) {
      pending.set(pid, { name: unfinished[1] ?? "", argsText: unfinished[2] ?? "", line: index, time });
      return;
    }
    const whole = CALL.exec(rest);
    const call = whole === null ? undefined : finish(pid, whole[1] ?? "", whole[2] ?? "", { line: index, time }, { line: index, time });
    if (call === undefined) unparsed.push(line);
    else syscalls.push(call);
  });
  for (const started of pending.values()) unparsed.push(`(never resumed) ${lines[started.line] ?? ""}`);
  syscalls.sort((a, b) => a.exitLine - b.exitLine);
  return { syscalls, unparsed, lines };
}

/** A trace line shortened for a message, with -xx fd annotations decoded so paths and sockets are readable. */
export function describeLine(line: string | undefined, maxChars = 220): string {
  if (line === undefined) return "(no line)";
  const readable = line
    .replace(/(\d)<((?:\\x[0-9a-f]{2})+)>/g, (_, digit: string, hex: string) => `${digit}<${decodeStraceString(hex).toString("latin1")}>`)
    // A Unix socket's annotation holds its path as a quoted string: <UNIX-STREAM:[1->2,"\x2f..."]>.
    .replace(/(\d<UNIX-\w+:\[[^\]"]*,)"((?:\\x[0-9a-f]{2})+)"\]>/g, (_, head: string, hex: string) => `${head}${decodeStraceString(hex).toString("latin1")}]>`);
  return readable.length > maxChars ? `${readable.slice(0, maxChars)}...` : readable;
}

/** A unix timestamp as strace printed it ("1796230818.823295762", any number of decimals) in nanoseconds. */
export function stampNs(time: string): bigint {
  const match = /^(\d+)\.(\d{1,9})$/.exec(time);
  if (match === null) throw new Error(`not a unix timestamp: ${JSON.stringify(time)} (trace with timestamps "unix-ns")`);
  return BigInt(match[1] ?? "0") * 1_000_000_000n + BigInt((match[2] ?? "0").padEnd(9, "0"));
}

/** The time of trace line `index`, in nanoseconds (unix timestamps only); undefined for a line without one. */
export function lineStampNs(log: StraceLog, index: number): bigint | undefined {
  const match = LINE.exec(log.lines[index] ?? "");
  return match === null ? undefined : stampNs(match[2] ?? "");
}

/** When the call entered, in nanoseconds: before the kernel ran it (a lower bound for its start). */
export function enteredAtNs(call: Syscall): bigint {
  return stampNs(call.entryTime);
}

/**
 * A time by which the call had certainly returned, in nanoseconds: the time
 * of its `resumed` line when strace split it, else the time of the next line
 * of the log (strace handled the call's return before the event on that
 * line, or it would have split it). Undefined when nothing follows it.
 */
export function returnedByNs(log: StraceLog, call: Syscall): bigint | undefined {
  if (call.exitLine !== call.entryLine) return stampNs(call.exitTime);
  for (let index = call.exitLine + 1; index < log.lines.length; index++) {
    const stamp = lineStampNs(log, index);
    if (stamp !== undefined) return stamp;
  }
  return undefined;
}

/**
 * The fds a successful open/openat with O_DSYNC (or O_SYNC) returned on a
 * path `isPath` accepts (needs -y/-yy, which prints the returned fd's path):
 * every write through one of them is synced before it returns, so such a
 * write is its own sync (the unit's FUA writes, Storage.writeDurable).
 */
export function dsyncFds(log: StraceLog, isPath: (path: string | undefined) => boolean): Set<number> {
  const fds = new Set<number>();
  for (const call of log.syscalls) {
    if ((call.name !== "openat" && call.name !== "open") || call.ret === undefined || call.ret < 0) continue;
    const flags = call.args[call.name === "openat" ? 2 : 1] ?? "";
    if (!/\bO_(D)?SYNC\b/.test(flags)) continue;
    const opened = parseFdArg(call.result.trim());
    if (opened !== undefined && isPath(opened.path)) fds.add(opened.fd);
  }
  return fds;
}
