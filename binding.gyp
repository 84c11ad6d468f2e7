{
  "targets": [
    {
      "target_name": "ipsan_io",
      "sources": ["src/native/ipsan_io.cc"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra", "-std=c++17"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"]
    }
  ]
}
