/* LD_PRELOAD shim for the benchmark's TLS jobs: fio's nbd engine (fio 3.33)
 * calls nbd_connect_uri without nbd_set_uri_allow_local_file, so libnbd
 * refuses the ?tls-psk-file= of an nbds:// URI. This calls it first, then the
 * real nbd_connect_uri. Built by src/testing/fio_tls.ts (benchmark and tests) into a work dir. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
struct nbd_handle;
int nbd_connect_uri(struct nbd_handle *h, const char *uri) {
  int (*allow)(struct nbd_handle *, bool) = (int (*)(struct nbd_handle *, bool))dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
  int (*real)(struct nbd_handle *, const char *) = (int (*)(struct nbd_handle *, const char *))dlsym(RTLD_NEXT, "nbd_connect_uri");
  if (allow != 0) allow(h, true);
  return real(h, uri);
}
