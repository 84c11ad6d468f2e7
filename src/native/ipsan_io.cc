// ipsan_io: the few Linux file operations Node's fs module lacks, for the
// unit's storage layer (src/unit/native.ts is the only caller).
//
//   fallocate(fd, mode, offset, length)   -> Promise<number>  punch hole / zero range (resolves 0)
//   lseek(fd, offset, whence)             -> Promise<number>  SEEK_DATA / SEEK_HOLE / SEEK_END / SEEK_SET
//   blkGetSize64(fd)                      -> Promise<number>  size of a block device
//   blkDiscard(fd, offset, length)        -> Promise<number>  BLKDISCARD (resolves 0)
//   blkZeroOut(fd, offset, length)        -> Promise<number>  BLKZEROOUT (resolves 0)
//   flock(fd, exclusive)                  -> number           0 or errno (never blocks: LOCK_NB)
//   preadNoWait(fd, buf, off, len, pos)   -> number           bytes, or -errno (-EAGAIN: not cached)
//   pwriteNoWait(fd, buf, off, len, pos)  -> number           bytes, or -errno (-EAGAIN: would block)
//   pwritevNoWait(fd, [buf...], pos)      -> number           the same over a list of buffers (<= IOV_COUNT_MAX)
//   sendFileNow(sock, header, fd, pos, len) -> number          header then sendfile(2) of cached file bytes: bytes sent, or -errno
//
// The two NoWait calls are synchronous on purpose: preadv2/pwritev2 with
// RWF_NOWAIT only copy to or from the page cache and return EAGAIN instead
// of waiting for the disk, so the event loop does the cheap case itself and
// only a miss pays for a trip through the thread pool (the caller falls back
// to fs.read/fs.write).
//
// Everything that can touch the disk runs as napi async work on libuv's
// thread pool, so the event loop never blocks. Failures reject with an Error
// whose `code` is the errno name ("EOPNOTSUPP") and `errno` its number, the
// same shape Node's own fs errors have. Written against the node-api C API
// (node_api.h) only: no C++ wrapper library, no npm dependency.
//
// Arguments are checked before anything reaches the kernel: fd an integer in
// [0, INT_MAX] (never narrowed, so 2^32 + 3 is not fd 3), mode and whence one
// of the exported constants, offsets and lengths safe integers >= 0 whose
// sum stays a safe integer (so well inside off_t), buffers Uint8Arrays (a
// Buffer is one) that are not detached, with offset + length inside them.
// A bad argument is a TypeError (code ERR_INVALID_ARG_TYPE or
// ERR_INVALID_ARG_VALUE) or RangeError (ERR_OUT_OF_RANGE) naming the function
// and the argument: thrown by the synchronous calls, the rejection of the
// promise for the others. Every promise returned settles exactly once.

#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <memory>

namespace {

static_assert(sizeof(off_t) == 8, "_FILE_OFFSET_BITS=64: every safe-integer offset fits off_t");

constexpr int64_t kSafeMax = 9007199254740991;  // Number.MAX_SAFE_INTEGER, 2^53 - 1
constexpr uint32_t kIovCountMax = 1024;
constexpr int64_t kFallocModes = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;

// ---- node-api failures -----------------------------------------------------

// Leaves an exception pending for a failed node-api call: the call's own when
// it threw one (a getter, a terminating worker), else an Error naming it.
void ThrowFailed(napi_env env, napi_status status, const char* call) {
  const napi_extended_error_info* info = nullptr;
  const char* why = napi_get_last_error_info(env, &info) == napi_ok && info->error_message != nullptr ? info->error_message : "failed";
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) != napi_ok || pending) return;
  char text[256];
  snprintf(text, sizeof text, "ipsan_io: %s: %s (napi_status %d)", call, why, static_cast<int>(status));
  napi_throw_error(env, "ERR_IPSAN_NAPI", text);  // if even this fails there is nothing left to try
}

// Every node-api status is checked: on failure an exception is left pending
// and the calling function returns nullptr (CHECK) or `value` (CHECK_OR).
// Both expect a napi_env named `env` in scope.
#define CHECK_OR(call, value)           \
  do {                                  \
    napi_status status_ = (call);       \
    if (status_ != napi_ok) {           \
      ThrowFailed(env, status_, #call); \
      return value;                     \
    }                                   \
  } while (0)
#define CHECK(call) CHECK_OR(call, nullptr)

// The pending exception, taken so that it can reject a promise instead of
// being thrown; a plain Error when nothing is pending; nullptr if all fails.
napi_value TakeException(napi_env env) {
  bool pending = false;
  napi_value error = nullptr;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending && napi_get_and_clear_last_exception(env, &error) == napi_ok) return error;
  napi_value message;
  if (napi_create_string_utf8(env, "ipsan_io: failed", NAPI_AUTO_LENGTH, &message) == napi_ok &&
      napi_create_error(env, nullptr, message, &error) == napi_ok)
    return error;
  return nullptr;
}

// Settles a promise: resolves with `value`, or rejects with it; a nullptr
// `value` (making it failed) rejects with the pending exception instead. If
// settling itself fails the environment is being torn down and nobody is
// left to tell, so those statuses are deliberately dropped.
void Settle(napi_env env, napi_deferred deferred, bool resolve, napi_value value) {
  if (value == nullptr) {
    resolve = false;
    value = TakeException(env);
    if (value == nullptr && napi_get_undefined(env, &value) != napi_ok) return;
  }
  if (resolve) (void)napi_resolve_deferred(env, deferred, value);
  else (void)napi_reject_deferred(env, deferred, value);
}

napi_value Number(napi_env env, int64_t n) {
  napi_value value;
  CHECK(napi_create_int64(env, n, &value));
  return value;
}

// ---- argument checks ---------------------------------------------------------

enum class Bad { kType, kValue, kRange };

// Throws a TypeError (kType: wrong type; kValue: right type, unusable value)
// or RangeError (kRange); returns false so checks read `return Fail(...)`.
__attribute__((format(printf, 3, 4))) bool Fail(napi_env env, Bad bad, const char* format, ...) {
  char text[320];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  if (bad == Bad::kRange) (void)napi_throw_range_error(env, "ERR_OUT_OF_RANGE", text);
  else (void)napi_throw_type_error(env, bad == Bad::kType ? "ERR_INVALID_ARG_TYPE" : "ERR_INVALID_ARG_VALUE", text);
  return false;
}

const char* TypeName(napi_valuetype type) {
  switch (type) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: return "a boolean";
    case napi_number: return "a number";
    case napi_string: return "a string";
    case napi_symbol: return "a symbol";
    case napi_object: return "an object";
    case napi_function: return "a function";
    case napi_external: return "an external";
    case napi_bigint: return "a bigint";
  }
  return "something else";
}

// A number the way JavaScript prints it, for messages: "4294967299", "0.5", "NaN".
void FormatNumber(double d, char* out, size_t size) {
  if (isnan(d)) snprintf(out, size, "NaN");
  else if (isinf(d)) snprintf(out, size, d > 0 ? "Infinity" : "-Infinity");
  else
    for (int digits = 15; digits <= 17; digits++) {
      snprintf(out, size, "%.*g", digits, d);
      if (strtod(out, nullptr) == d) break;
    }
}

// One call's arguments (missing ones read as undefined). Each check throws a
// TypeError or RangeError naming the function and argument and returns false.
// None of them runs JavaScript, so a pointer from Bytes() stays valid across
// the checks that follow it.
struct Args {
  napi_env env;
  const char* fn;
  napi_value argv[5] = {};

  bool Read(napi_callback_info info) {
    size_t argc = 5;
    CHECK_OR(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr), false);
    return true;
  }

  // argv[i] as an integer in [min, max] (both within the safe integers, so exact).
  bool Int(size_t i, const char* name, int64_t min, int64_t max, int64_t* out) {
    napi_valuetype type;
    CHECK_OR(napi_typeof(env, argv[i], &type), false);
    if (type != napi_number)
      return Fail(env, Bad::kType, "%s: %s must be an integer in [%" PRId64 ", %" PRId64 "], got %s", fn, name, min, max, TypeName(type));
    double d;
    CHECK_OR(napi_get_value_double(env, argv[i], &d), false);
    if (!(d >= static_cast<double>(min) && d <= static_cast<double>(max)) || d != trunc(d)) {
      char got[40];
      FormatNumber(d, got, sizeof got);
      return Fail(env, Bad::kRange, "%s: %s must be an integer in [%" PRId64 ", %" PRId64 "], got %s", fn, name, min, max, got);
    }
    *out = static_cast<int64_t>(d);
    return true;
  }

  bool Fd(int* fd) {
    int64_t value;
    if (!Int(0, "fd", 0, INT_MAX, &value)) return false;
    *fd = static_cast<int>(value);
    return true;
  }

  // A second file descriptor, in argv[i].
  bool IntFd(size_t i, const char* name, int* fd) {
    int64_t value;
    if (!Int(i, name, 0, INT_MAX, &value)) return false;
    *fd = static_cast<int>(value);
    return true;
  }

  bool Bool(size_t i, const char* name, bool* out) {
    napi_valuetype type;
    CHECK_OR(napi_typeof(env, argv[i], &type), false);
    if (type != napi_boolean) return Fail(env, Bad::kType, "%s: %s must be a boolean, got %s", fn, name, TypeName(type));
    CHECK_OR(napi_get_value_bool(env, argv[i], out), false);
    return true;
  }

  // `start + length <= limit`, all three non-negative (no overflow: checked by subtraction).
  bool Fits(const char* what, int64_t start, int64_t length, int64_t limit) {
    if (start <= limit && length <= limit - start) return true;
    return Fail(env, Bad::kRange, "%s: %s must be at most %" PRId64 ", got %" PRId64 " + %" PRId64, fn, what, limit, start, length);
  }

  // An offset and length in argv[i], argv[i + 1] whose end is a safe integer too.
  bool Extent(size_t i, int64_t* offset, int64_t* length) {
    return Int(i, "offset", 0, kSafeMax, offset) && Int(i + 1, "length", 0, kSafeMax, length) && Fits("offset + length", *offset, *length, kSafeMax);
  }

  // `value` as the bytes of a Uint8Array (a Buffer is one) that is not
  // detached. The pointer is valid until JavaScript runs again: a transfer
  // detaches the ArrayBuffer and the memory goes with the new owner.
  bool Bytes(napi_value value, const char* name, char** data, size_t* length) {
    bool typed = false;
    CHECK_OR(napi_is_typedarray(env, value, &typed), false);
    napi_typedarray_type type = napi_int8_array;
    napi_value arraybuffer = nullptr;
    void* base = nullptr;
    size_t byteOffset = 0;
    if (typed) CHECK_OR(napi_get_typedarray_info(env, value, &type, length, &base, &arraybuffer, &byteOffset), false);
    if (!typed || type != napi_uint8_array) {
      napi_valuetype valueType;
      CHECK_OR(napi_typeof(env, value, &valueType), false);
      return Fail(env, Bad::kType, "%s: %s must be a Buffer or Uint8Array, got %s", fn, name, typed ? "another typed array" : TypeName(valueType));
    }
    // A view of a detached buffer reads as empty, so this is the only sign of it
    // (a genuinely empty ArrayBuffer is not reported as detached).
    bool detached = false;
    CHECK_OR(napi_is_detached_arraybuffer(env, arraybuffer, &detached), false);
    if (detached) return Fail(env, Bad::kValue, "%s: %s is detached (its ArrayBuffer was transferred)", fn, name);
    *data = static_cast<char*>(base);
    return true;
  }
};

// ---- async work: fallocate, lseek, block-device ioctls ---------------------

enum class Op { kFallocate, kLseek, kBlkGetSize64, kBlkDiscard, kBlkZeroOut };

struct Work {
  napi_async_work work = nullptr;
  napi_deferred deferred = nullptr;
  Op op = Op::kFallocate;
  int fd = -1;
  int64_t a = 0;  // offset (or mode for fallocate)
  int64_t b = 0;  // length (or offset for fallocate, whence for lseek)
  int64_t c = 0;  // length for fallocate
  int64_t result = 0;
  int error = 0;  // errno, 0 on success
};

const char* ErrnoName(int error) {
  switch (error) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EOVERFLOW: return "EOVERFLOW";
    case EDQUOT: return "EDQUOT";
    case ECANCELED: return "ECANCELED";
    default: return "EUNKNOWN";
  }
}

// The name in error messages: the function for argument errors, the system call for errno errors.
const char* FunctionName(Op op) {
  switch (op) {
    case Op::kFallocate: return "fallocate";
    case Op::kLseek: return "lseek";
    case Op::kBlkGetSize64: return "blkGetSize64";
    case Op::kBlkDiscard: return "blkDiscard";
    case Op::kBlkZeroOut: return "blkZeroOut";
  }
  return "unknown";
}

const char* SyscallName(Op op) {
  switch (op) {
    case Op::kFallocate: return "fallocate";
    case Op::kLseek: return "lseek";
    case Op::kBlkGetSize64: return "ioctl(BLKGETSIZE64)";
    case Op::kBlkDiscard: return "ioctl(BLKDISCARD)";
    case Op::kBlkZeroOut: return "ioctl(BLKZEROOUT)";
  }
  return "unknown";
}

void Execute(napi_env /*env*/, void* data) {
  Work* w = static_cast<Work*>(data);
  w->error = 0;
  switch (w->op) {
    case Op::kFallocate: {
      int rc;
      do {
        rc = fallocate(w->fd, static_cast<int>(w->a), static_cast<off_t>(w->b), static_cast<off_t>(w->c));
      } while (rc != 0 && errno == EINTR);
      if (rc != 0) w->error = errno;
      break;
    }
    case Op::kLseek: {
      off_t rc = lseek(w->fd, static_cast<off_t>(w->a), static_cast<int>(w->b));
      if (rc < 0) w->error = errno;
      else w->result = rc;
      break;
    }
    case Op::kBlkGetSize64: {
      uint64_t size = 0;
      if (ioctl(w->fd, BLKGETSIZE64, &size) != 0) w->error = errno;
      else if (size > static_cast<uint64_t>(kSafeMax)) w->error = EOVERFLOW;  // not exact as a JavaScript number
      else w->result = static_cast<int64_t>(size);
      break;
    }
    case Op::kBlkDiscard:
    case Op::kBlkZeroOut: {
      uint64_t range[2] = {static_cast<uint64_t>(w->a), static_cast<uint64_t>(w->b)};
      unsigned long request = w->op == Op::kBlkDiscard ? BLKDISCARD : BLKZEROOUT;
      if (ioctl(w->fd, request, range) != 0) w->error = errno;
      break;
    }
  }
}

napi_value MakeErrnoError(napi_env env, int error, const char* syscall) {
  char text[256];
  snprintf(text, sizeof text, "%s: %s (%s)", syscall, strerror(error), ErrnoName(error));
  napi_value message, code, value, errnoValue, syscallValue;
  CHECK(napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message));
  CHECK(napi_create_string_utf8(env, ErrnoName(error), NAPI_AUTO_LENGTH, &code));
  CHECK(napi_create_error(env, code, message, &value));
  CHECK(napi_create_int32(env, error, &errnoValue));
  CHECK(napi_set_named_property(env, value, "errno", errnoValue));
  CHECK(napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscallValue));
  CHECK(napi_set_named_property(env, value, "syscall", syscallValue));
  return value;
}

// Runs on the event loop once Execute is done (or the work was cancelled):
// settles the promise and frees the work, whatever happened.
void Complete(napi_env env, napi_status status, void* data) {
  std::unique_ptr<Work> w(static_cast<Work*>(data));
  if (status != napi_ok && w->error == 0) w->error = ECANCELED;  // nothing cancels work, but settle anyway
  bool ok = w->error == 0;
  Settle(env, w->deferred, ok, ok ? Number(env, w->result) : MakeErrnoError(env, w->error, SyscallName(w->op)));
  (void)napi_delete_async_work(env, w->work);  // fails only for a null handle; nothing to undo
}

// Reads the arguments for w->op and queues the work. False, with an exception
// pending and nothing left queued or allocated in node-api, when that fails.
bool Queue(napi_env env, napi_callback_info info, Work* w) {
  Args args{env, FunctionName(w->op)};
  if (!args.Read(info) || !args.Fd(&w->fd)) return false;
  switch (w->op) {
    case Op::kFallocate:
      if (!args.Int(1, "mode", 0, kFallocModes, &w->a)) return false;
      if ((w->a & ~kFallocModes) != 0)
        return Fail(env, Bad::kRange, "fallocate: mode must combine FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE (%#" PRIx64 "), got %#" PRIx64,
                    kFallocModes, w->a);
      if (!args.Extent(2, &w->b, &w->c)) return false;
      break;
    case Op::kLseek:
      if (!args.Int(1, "offset", 0, kSafeMax, &w->a) || !args.Int(2, "whence", 0, SEEK_HOLE, &w->b)) return false;
      if (w->b == SEEK_CUR) return Fail(env, Bad::kRange, "lseek: whence must be SEEK_SET, SEEK_END, SEEK_DATA or SEEK_HOLE, got SEEK_CUR");
      break;
    case Op::kBlkGetSize64:
      break;
    case Op::kBlkDiscard:
    case Op::kBlkZeroOut:
      if (!args.Extent(1, &w->a, &w->b)) return false;
      break;
  }
  napi_value name;
  CHECK_OR(napi_create_string_utf8(env, SyscallName(w->op), NAPI_AUTO_LENGTH, &name), false);
  CHECK_OR(napi_create_async_work(env, nullptr, name, Execute, Complete, w, &w->work), false);
  napi_status status = napi_queue_async_work(env, w->work);
  if (status != napi_ok) {
    ThrowFailed(env, status, "napi_queue_async_work");
    (void)napi_delete_async_work(env, w->work);  // never queued: Complete will not run
    return false;
  }
  return true;
}

// The promise-returning calls: any failure before the work is queued
// (arguments, node-api) rejects the promise rather than throwing.
napi_value StartWork(napi_env env, napi_callback_info info, Op op) {
  auto w = std::make_unique<Work>();
  w->op = op;
  napi_value promise;
  CHECK(napi_create_promise(env, &w->deferred, &promise));  // no promise to settle yet: throws
  if (Queue(env, info, w.get())) w.release();               // Complete owns it now
  else Settle(env, w->deferred, false, nullptr);            // rejects with the pending exception
  return promise;
}

napi_value Fallocate(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kFallocate); }
napi_value Lseek(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kLseek); }
napi_value BlkGetSize64(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkGetSize64); }
napi_value BlkDiscard(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkDiscard); }
napi_value BlkZeroOut(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkZeroOut); }

// ---- synchronous calls -------------------------------------------------------

// flock(fd, exclusive) with LOCK_NB: returns 0 or the errno (EWOULDBLOCK when
// another process holds the lock). Synchronous: LOCK_NB never waits.
napi_value Flock(napi_env env, napi_callback_info info) {
  Args args{env, "flock"};
  int fd;
  bool exclusive;
  if (!args.Read(info) || !args.Fd(&fd) || !args.Bool(1, "exclusive", &exclusive)) return nullptr;
  int rc = flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
  return Number(env, rc == 0 ? 0 : errno);
}

// preadNoWait / pwriteNoWait (fd, buffer, bufferOffset, length, position).
napi_value NoWait(napi_env env, napi_callback_info info, bool write) {
  Args args{env, write ? "pwriteNoWait" : "preadNoWait"};
  int fd;
  char* data;
  size_t size;
  int64_t bufferOffset, length, position;
  if (!args.Read(info) || !args.Fd(&fd) || !args.Bytes(args.argv[1], "buffer", &data, &size) ||
      !args.Int(2, "bufferOffset", 0, kSafeMax, &bufferOffset) || !args.Int(3, "length", 0, kSafeMax, &length) ||
      !args.Int(4, "position", 0, kSafeMax, &position) ||
      !args.Fits("bufferOffset + length", bufferOffset, length, static_cast<int64_t>(size)) ||
      !args.Fits("position + length", position, length, kSafeMax))
    return nullptr;
  struct iovec iov = {data + bufferOffset, static_cast<size_t>(length)};
  ssize_t rc;
  do {
    rc = write ? pwritev2(fd, &iov, 1, position, RWF_NOWAIT) : preadv2(fd, &iov, 1, position, RWF_NOWAIT);
  } while (rc < 0 && errno == EINTR);
  return Number(env, rc < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(rc));
}

#ifndef __NR_cachestat
#define __NR_cachestat 451  // the same number on every architecture (Linux 6.5)
#endif

struct CachestatRange {
  uint64_t off;
  uint64_t len;
};
struct Cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

// sendFileNow(socketFd, header, fileFd, position, length): a READ reply
// without copying its data through user space. Only when every page of
// [position, position + length) is in the page cache (cachestat(2), Linux
// 6.5) does it send `header` (MSG_MORE) and then the file bytes with
// sendfile(2), which hands the socket references to the cached pages. The
// socket is non-blocking: it stops when the socket buffer is full. Returns
// the bytes the socket took, header included (possibly fewer than all, even
// 0: the caller sends the rest itself), or -errno with nothing sent:
// -EAGAIN when a page is not cached (sendfile would wait for the disk),
// -ENOSYS without cachestat, -EINVAL/-EOPNOTSUPP where the socket cannot
// take file pages, or the socket's error. An error after some bytes went
// out returns the count; the caller's next write meets the error.
napi_value SendFileNow(napi_env env, napi_callback_info info) {
  Args args{env, "sendFileNow"};
  int socketFd, fileFd;
  char* header;
  size_t headerBytes;
  int64_t position, length;
  if (!args.Read(info) || !args.Fd(&socketFd) || !args.Bytes(args.argv[1], "header", &header, &headerBytes)) return nullptr;
  if (!args.IntFd(2, "fileFd", &fileFd) || !args.Int(3, "position", 0, kSafeMax, &position) || !args.Int(4, "length", 1, kSafeMax, &length) ||
      !args.Fits("position + length", position, length, kSafeMax))
    return nullptr;
  const int64_t page = 4096;
  const int64_t first = position / page;
  const int64_t pages = (position + length + page - 1) / page - first;
  CachestatRange range = {static_cast<uint64_t>(first * page), static_cast<uint64_t>(pages * page)};
  Cachestat stat = {};
  if (syscall(__NR_cachestat, fileFd, &range, &stat, 0) != 0) return Number(env, -static_cast<int64_t>(errno));
  if (stat.nr_cache < static_cast<uint64_t>(pages)) return Number(env, -static_cast<int64_t>(EAGAIN));
  int64_t sent = 0;
  while (sent < static_cast<int64_t>(headerBytes)) {
    ssize_t rc = send(socketFd, header + sent, headerBytes - sent, MSG_MORE | MSG_NOSIGNAL | MSG_DONTWAIT);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Number(env, sent > 0 ? sent : (errno == EWOULDBLOCK ? 0 : -static_cast<int64_t>(errno)));
    sent += rc;
  }
  off_t offset = static_cast<off_t>(position);
  int64_t left = length;
  while (left > 0) {
    ssize_t rc = sendfile(socketFd, fileFd, &offset, static_cast<size_t>(left));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 && errno != EAGAIN && sent == 0) return Number(env, -static_cast<int64_t>(errno));
    if (rc <= 0) break;
    sent += rc;
    left -= rc;
  }
  return Number(env, sent);
}

napi_value PreadNoWait(napi_env env, napi_callback_info info) { return NoWait(env, info, false); }
napi_value PwriteNoWait(napi_env env, napi_callback_info info) { return NoWait(env, info, true); }

// pwritevNoWait(fd, buffers, position): one pwritev2(RWF_NOWAIT) over the
// buffers in order, so a write that arrived in several socket chunks reaches
// the page cache without being gathered into one buffer first.
napi_value PwritevNoWait(napi_env env, napi_callback_info info) {
  Args args{env, "pwritevNoWait"};
  int fd;
  int64_t position;
  if (!args.Read(info) || !args.Fd(&fd) || !args.Int(2, "position", 0, kSafeMax, &position)) return nullptr;
  napi_value list = args.argv[1];
  bool isArray = false;  // false for a Proxy too, so no trap runs below
  CHECK(napi_is_array(env, list, &isArray));
  if (!isArray) {
    napi_valuetype type;
    CHECK(napi_typeof(env, list, &type));
    Fail(env, Bad::kType, "pwritevNoWait: buffers must be an Array, got %s", TypeName(type));
    return nullptr;
  }
  uint32_t count = 0;
  CHECK(napi_get_array_length(env, list, &count));
  if (count == 0 || count > kIovCountMax) {
    Fail(env, Bad::kRange, "pwritevNoWait: buffers must hold 1 to %" PRIu32 " buffers, got %" PRIu32, kIovCountMax, count);
    return nullptr;
  }
  // First fetch every element. Fetching can run JavaScript (an accessor on
  // the array, or on Array.prototype behind a hole) that might detach or
  // shrink a buffer fetched before it, so no pointer is taken until all are in.
  napi_value elements[kIovCountMax];
  for (uint32_t i = 0; i < count; i++) CHECK(napi_get_element(env, list, i, &elements[i]));
  // No JavaScript runs from here to pwritev2: the pointers taken now stay valid.
  struct iovec iov[kIovCountMax];
  int64_t total = 0;
  for (uint32_t i = 0; i < count; i++) {
    char name[24];
    snprintf(name, sizeof name, "buffers[%" PRIu32 "]", i);
    char* data;
    size_t size;
    if (!args.Bytes(elements[i], name, &data, &size) || !args.Fits("position + total length", position + total, static_cast<int64_t>(size), kSafeMax))
      return nullptr;
    iov[i] = {data, size};
    total += static_cast<int64_t>(size);
  }
  ssize_t rc;
  do {
    rc = pwritev2(fd, iov, static_cast<int>(count), position, RWF_NOWAIT);
  } while (rc < 0 && errno == EINTR);
  return Number(env, rc < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(rc));
}

// ---- module ------------------------------------------------------------------

napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
      {"fallocate", nullptr, Fallocate, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"lseek", nullptr, Lseek, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"blkGetSize64", nullptr, BlkGetSize64, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"blkDiscard", nullptr, BlkDiscard, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"blkZeroOut", nullptr, BlkZeroOut, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"flock", nullptr, Flock, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"preadNoWait", nullptr, PreadNoWait, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"pwriteNoWait", nullptr, PwriteNoWait, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"pwritevNoWait", nullptr, PwritevNoWait, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"sendFileNow", nullptr, SendFileNow, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  CHECK(napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods));
  const struct {
    const char* name;
    int64_t value;
  } constants[] = {
      {"FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE},
      {"FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE},
      {"FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE},
      {"SEEK_SET", SEEK_SET},
      {"SEEK_END", SEEK_END},
      {"SEEK_DATA", SEEK_DATA},
      {"SEEK_HOLE", SEEK_HOLE},
      {"EWOULDBLOCK", EWOULDBLOCK},
      {"EAGAIN", EAGAIN},
      {"EOPNOTSUPP", EOPNOTSUPP},
      {"EINVAL", EINVAL},
      {"ENOSYS", ENOSYS},
      {"IOV_COUNT_MAX", kIovCountMax},
  };
  for (const auto& constant : constants) {
    napi_value value = Number(env, constant.value);
    if (value == nullptr) return nullptr;
    CHECK(napi_set_named_property(env, exports, constant.name, value));
  }
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
