// One catalogue of stable error codes (docs/errors.md), each mapped once to an
// NBD errno and an HTTP status. Operating errors (bad input, full disk, dead
// peer) are IpsanError instances; programmer errors are assertion failures
// (src/util/assert.ts) and are never mapped to a wire code.

export const NBD_ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrno = (typeof NBD_ERRNO)[keyof typeof NBD_ERRNO];

export const ERROR_CODES = {
  // code: [nbd errno, http status]
  INVALID_ARGUMENT: [NBD_ERRNO.EINVAL, 400],
  OUT_OF_RANGE: [NBD_ERRNO.EINVAL, 400],
  TOO_LARGE: [NBD_ERRNO.EOVERFLOW, 413],
  NOT_FOUND: [NBD_ERRNO.EINVAL, 404],
  ALREADY_EXISTS: [NBD_ERRNO.EINVAL, 409],
  CONFLICT: [NBD_ERRNO.EINVAL, 409],
  NO_SPACE: [NBD_ERRNO.ENOSPC, 507],
  READ_ONLY: [NBD_ERRNO.EPERM, 403],
  PERMISSION_DENIED: [NBD_ERRNO.EPERM, 403],
  UNAUTHENTICATED: [NBD_ERRNO.EPERM, 401],
  NOT_SUPPORTED: [NBD_ERRNO.ENOTSUP, 501],
  IO_ERROR: [NBD_ERRNO.EIO, 500],
  SHUTTING_DOWN: [NBD_ERRNO.ESHUTDOWN, 503],
  UNAVAILABLE: [NBD_ERRNO.EIO, 503],
  CORRUPT: [NBD_ERRNO.EIO, 500],
} as const satisfies Record<string, readonly [NbdErrno, number]>;
export type ErrorCode = keyof typeof ERROR_CODES;

export class IpsanError extends Error {
  readonly code: ErrorCode;
  /** The flag or JSON field at fault, for API error bodies ({error:{code, message, field}}). */
  readonly field: string | undefined;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; field?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "IpsanError";
    this.code = code;
    this.field = options?.field;
  }
  get nbdErrno(): NbdErrno {
    return ERROR_CODES[this.code][0];
  }
  get httpStatus(): number {
    return ERROR_CODES[this.code][1];
  }
}

/** Bad command-line input: printed without a stack trace, exit status 2. */
export class UsageError extends IpsanError {
  constructor(message: string) {
    super("INVALID_ARGUMENT", message);
    this.name = "UsageError";
  }
}

/** Maps any thrown value to an NBD errno; unknown errors are EIO. */
export function toNbdErrno(error: unknown): NbdErrno {
  if (error instanceof IpsanError) return error.nbdErrno;
  const code = (error as NodeJS.ErrnoException | null)?.code;
  if (code === "ENOSPC" || code === "EDQUOT") return NBD_ERRNO.ENOSPC;
  if (code === "EROFS" || code === "EPERM" || code === "EACCES") return NBD_ERRNO.EPERM;
  return NBD_ERRNO.EIO;
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
