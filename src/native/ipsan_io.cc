// ipsan_io: the few Linux file operations Node's fs module lacks, for the
// unit's storage layer (src/unit/native.ts is the only caller).
//
//   fallocate(fd, mode, offset, length)   -> Promise<void>    punch hole / zero range
//   lseek(fd, offset, whence)             -> Promise<number>  SEEK_DATA / SEEK_HOLE / SEEK_END
//   blkGetSize64(fd)                      -> Promise<number>  size of a block device
//   blkDiscard(fd, offset, length)        -> Promise<void>    BLKDISCARD
//   blkZeroOut(fd, offset, length)        -> Promise<void>    BLKZEROOUT
//   flock(fd, exclusive)                  -> number           0 or errno (never blocks: LOCK_NB)
//   preadNoWait(fd, buf, off, len, pos)   -> number           bytes, or -errno (-EAGAIN: not cached)
//   pwriteNoWait(fd, buf, off, len, pos)  -> number           bytes, or -errno (-EAGAIN: would block)
//   pwritevNoWait(fd, [buf...], pos)      -> number           the same over a list of buffers (<= IOV_COUNT_MAX)
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

#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

namespace {

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

#define NAPI_CALL(env, call)                                          \
  do {                                                                \
    napi_status status_ = (call);                                     \
    if (status_ != napi_ok) {                                         \
      napi_throw_error((env), nullptr, "ipsan_io: napi call failed: " #call); \
      return nullptr;                                                 \
    }                                                                 \
  } while (0)

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
    default: return "EUNKNOWN";
  }
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
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message);
  napi_create_string_utf8(env, ErrnoName(error), NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, message, &value);
  napi_create_int32(env, error, &errnoValue);
  napi_set_named_property(env, value, "errno", errnoValue);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscallValue);
  napi_set_named_property(env, value, "syscall", syscallValue);
  return value;
}

const char* OpName(Op op) {
  switch (op) {
    case Op::kFallocate: return "fallocate";
    case Op::kLseek: return "lseek";
    case Op::kBlkGetSize64: return "ioctl(BLKGETSIZE64)";
    case Op::kBlkDiscard: return "ioctl(BLKDISCARD)";
    case Op::kBlkZeroOut: return "ioctl(BLKZEROOUT)";
  }
  return "unknown";
}

void Complete(napi_env env, napi_status /*status*/, void* data) {
  Work* w = static_cast<Work*>(data);
  if (w->error != 0) {
    napi_reject_deferred(env, w->deferred, MakeErrnoError(env, w->error, OpName(w->op)));
  } else {
    napi_value result;
    napi_create_int64(env, w->result, &result);
    napi_resolve_deferred(env, w->deferred, result);
  }
  napi_delete_async_work(env, w->work);
  delete w;
}

// Reads argument i as an integer; numbers must be safe integers (below 2^53).
bool GetInt64(napi_env env, napi_value value, int64_t* out) {
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_number) return false;
  double d;
  if (napi_get_value_double(env, value, &d) != napi_ok) return false;
  if (!(d >= -9007199254740991.0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<int64_t>(d))) return false;
  *out = static_cast<int64_t>(d);
  return true;
}

napi_value StartWork(napi_env env, napi_callback_info info, Op op, size_t argcWanted) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  if (argc < argcWanted) {
    napi_throw_type_error(env, "EINVAL", "ipsan_io: too few arguments");
    return nullptr;
  }
  int64_t values[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < argcWanted; i++) {
    if (!GetInt64(env, argv[i], &values[i])) {
      napi_throw_type_error(env, "EINVAL", "ipsan_io: arguments must be safe integers");
      return nullptr;
    }
  }
  Work* w = new Work();
  w->op = op;
  w->fd = static_cast<int>(values[0]);
  w->a = values[1];
  w->b = values[2];
  w->c = values[3];
  napi_value promise, name;
  NAPI_CALL(env, napi_create_promise(env, &w->deferred, &promise));
  NAPI_CALL(env, napi_create_string_utf8(env, OpName(op), NAPI_AUTO_LENGTH, &name));
  NAPI_CALL(env, napi_create_async_work(env, nullptr, name, Execute, Complete, w, &w->work));
  NAPI_CALL(env, napi_queue_async_work(env, w->work));
  return promise;
}

napi_value Fallocate(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kFallocate, 4); }
napi_value Lseek(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kLseek, 3); }
napi_value BlkGetSize64(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkGetSize64, 1); }
napi_value BlkDiscard(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkDiscard, 3); }
napi_value BlkZeroOut(napi_env env, napi_callback_info info) { return StartWork(env, info, Op::kBlkZeroOut, 3); }

// flock(fd, exclusive) with LOCK_NB: returns 0 or the errno (EWOULDBLOCK when
// another process holds the lock). Synchronous: LOCK_NB never waits.
napi_value Flock(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int64_t fd = -1;
  bool exclusive = true;
  if (argc < 2 || !GetInt64(env, argv[0], &fd) || napi_get_value_bool(env, argv[1], &exclusive) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "ipsan_io: flock(fd: number, exclusive: boolean)");
    return nullptr;
  }
  int rc = flock(static_cast<int>(fd), (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
  napi_value result;
  NAPI_CALL(env, napi_create_int32(env, rc == 0 ? 0 : errno, &result));
  return result;
}

// preadNoWait / pwriteNoWait (fd, buffer, bufferOffset, length, position).
napi_value NoWait(napi_env env, napi_callback_info info, bool write) {
  size_t argc = 5;
  napi_value argv[5];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int64_t fd = -1, bufferOffset = 0, length = 0, position = 0;
  void* data = nullptr;
  size_t bufferLength = 0;
  if (argc < 5 || !GetInt64(env, argv[0], &fd) || napi_get_buffer_info(env, argv[1], &data, &bufferLength) != napi_ok ||
      !GetInt64(env, argv[2], &bufferOffset) || !GetInt64(env, argv[3], &length) || !GetInt64(env, argv[4], &position) ||
      bufferOffset < 0 || length < 0 || position < 0 || static_cast<uint64_t>(bufferOffset + length) > bufferLength) {
    napi_throw_type_error(env, "EINVAL", "ipsan_io: (fd, buffer, bufferOffset, length, position) out of range");
    return nullptr;
  }
  struct iovec iov;
  iov.iov_base = static_cast<char*>(data) + bufferOffset;
  iov.iov_len = static_cast<size_t>(length);
  ssize_t rc;
  do {
    rc = write ? pwritev2(static_cast<int>(fd), &iov, 1, static_cast<off_t>(position), RWF_NOWAIT)
               : preadv2(static_cast<int>(fd), &iov, 1, static_cast<off_t>(position), RWF_NOWAIT);
  } while (rc < 0 && errno == EINTR);
  napi_value result;
  NAPI_CALL(env, napi_create_int64(env, rc < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(rc), &result));
  return result;
}

// pwritevNoWait(fd, buffers, position): one pwritev2(RWF_NOWAIT) over the
// buffers in order, so a write that arrived in several socket chunks reaches
// the page cache without being gathered into one buffer first.
constexpr uint32_t kIovCountMax = 1024;

napi_value PwritevNoWait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int64_t fd = -1, position = 0;
  bool isArray = false;
  uint32_t count = 0;
  if (argc < 3 || !GetInt64(env, argv[0], &fd) || napi_is_array(env, argv[1], &isArray) != napi_ok || !isArray ||
      napi_get_array_length(env, argv[1], &count) != napi_ok || count == 0 || count > kIovCountMax ||
      !GetInt64(env, argv[2], &position) || position < 0) {
    napi_throw_type_error(env, "EINVAL", "ipsan_io: pwritevNoWait(fd, buffers[1..1024], position) out of range");
    return nullptr;
  }
  struct iovec iov[kIovCountMax];
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    void* data = nullptr;
    size_t length = 0;
    if (napi_get_element(env, argv[1], i, &element) != napi_ok || napi_get_buffer_info(env, element, &data, &length) != napi_ok) {
      napi_throw_type_error(env, "EINVAL", "ipsan_io: pwritevNoWait: every element must be a Buffer");
      return nullptr;
    }
    iov[i].iov_base = data;
    iov[i].iov_len = length;
  }
  ssize_t rc;
  do {
    rc = pwritev2(static_cast<int>(fd), iov, static_cast<int>(count), static_cast<off_t>(position), RWF_NOWAIT);
  } while (rc < 0 && errno == EINTR);
  napi_value result;
  NAPI_CALL(env, napi_create_int64(env, rc < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(rc), &result));
  return result;
}

napi_value PreadNoWait(napi_env env, napi_callback_info info) { return NoWait(env, info, false); }
napi_value PwriteNoWait(napi_env env, napi_callback_info info) { return NoWait(env, info, true); }

void SetInt(napi_env env, napi_value target, const char* name, int64_t value) {
  napi_value v;
  napi_create_int64(env, value, &v);
  napi_set_named_property(env, target, name, v);
}

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
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
  SetInt(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  SetInt(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  SetInt(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
  SetInt(env, exports, "SEEK_SET", SEEK_SET);
  SetInt(env, exports, "SEEK_END", SEEK_END);
  SetInt(env, exports, "SEEK_DATA", SEEK_DATA);
  SetInt(env, exports, "SEEK_HOLE", SEEK_HOLE);
  SetInt(env, exports, "EWOULDBLOCK", EWOULDBLOCK);
  SetInt(env, exports, "EAGAIN", EAGAIN);
  SetInt(env, exports, "EOPNOTSUPP", EOPNOTSUPP);
  SetInt(env, exports, "IOV_COUNT_MAX", kIovCountMax);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
