/* The C API from C: one engine through whole training steps (world 1), two
 * ranks as threads of one process (local group), two ranks as processes
 * (gloo, through a store directory and through store callbacks), every misuse we know of
 * (each must return its status with a message, never crash), and a failed
 * background read (a corrupted swap file). Compiled as C99, linked against
 * libztier.so only.
 *
 * Swap files go under $ZTIER_TEST_TMPDIR (a real disk: O_DIRECT). */
#define _XOPEN_SOURCE 700
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ztier/ztier.h"

static int g_failures = 0;

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                       \
    }                                                                     \
  } while (0)

/* Expects `call` to return `want`; prints the status and message (the
 * misuse report) and checks a message came with every error. */
#define EXPECT_STATUS(want, call, label)                                       \
  do {                                                                         \
    ztier_status_t got_ = (call);                                              \
    if (got_ != (want)) {                                                      \
      fprintf(stderr, "%s:%d: %s: got %s, want %s (%s)\n", __FILE__, __LINE__, \
              label, ztier_status_string(got_), ztier_status_string(want),     \
              ztier_last_error());                                             \
      ++g_failures;                                                            \
    } else if (got_ != ZTIER_STATUS_OK) {                                      \
      printf("misuse %-34s -> %-32s %s\n", label, ztier_status_string(got_),   \
             ztier_last_error());                                              \
      CHECK(ztier_last_error()[0] != '\0');                                    \
    }                                                                          \
  } while (0)

#define OK(call) EXPECT_STATUS(ZTIER_STATUS_OK, call, #call)

static char g_dir[512];

static void MakeConfig(char* out, size_t n, const char* sub) {
  char path[600];
  snprintf(path, sizeof(path), "%s/%s", g_dir, sub);
  snprintf(out, n,
           "tiers:\n"
           "  params: nvme\n"
           "  host: {pin_memory: false}\n"
           "  nvme: {paths: [\"%s\"], buffer_count: 4, buffer_size: 4096,\n"
           "         buffer_element_bytes: 4}\n"
           "coordinator: {param_persistence_threshold: 0, max_reuse_distance: 0}\n"
           "io: {register_buffers: false}\n",
           path);
}

/* ---- a store as callbacks: one file per key in a directory (what a
 * trainer would do with its own key-value store) ---- */

static void KeyPath(char* out, size_t n, const char* dir, const char* key) {
  snprintf(out, n, "%s/", dir);
  size_t len = strlen(out);
  for (const char* k = key; *k && len + 1 < n; ++k) out[len++] = *k == '/' ? '_' : *k;
  out[len] = '\0';
}

static int FileStoreSet(void* context, const char* key, const void* value, size_t bytes) {
  char path[1024], tmp[1100];
  KeyPath(path, sizeof(path), context, key);
  snprintf(tmp, sizeof(tmp), "%s.tmp%d", path, (int)getpid());
  FILE* f = fopen(tmp, "wb");
  if (!f) return 2;
  const int ok = fwrite(value, 1, bytes, f) == bytes;
  if (fclose(f) != 0 || !ok) return 2;
  return rename(tmp, path) == 0 ? 0 : 2; /* readers never see half a value */
}

static int FileStoreGet(void* context, const char* key, void* value, size_t capacity,
                        size_t* bytes, uint32_t timeout_ms) {
  char path[1024];
  KeyPath(path, sizeof(path), context, key);
  const struct timespec ms = {0, 1000000};
  for (uint32_t waited = 0;; ++waited) {
    FILE* f = fopen(path, "rb");
    if (f) {
      fseek(f, 0, SEEK_END);
      *bytes = (size_t)ftell(f);
      fseek(f, 0, SEEK_SET);
      const size_t n = *bytes < capacity ? *bytes : capacity;
      const int ok = fread(value, 1, n, f) == n;
      fclose(f);
      return ok ? 0 : 2;
    }
    if (waited >= timeout_ms) return 1;
    nanosleep(&ms, NULL);
  }
}

enum Comm { kCommLocal, kCommGlooPath, kCommGlooStore };
/* Each way of meeting runs its two ranks in its own directory. */
static const char* const kCommSub[] = {"world2", "world2_gloo_path", "world2_gloo_store"};

static ztier_engine_t* CreateEngineWith(const char* sub, uint32_t rank, uint32_t world,
                                        ztier_local_group_t* group, enum Comm comm) {
  char yaml[1024], store_dir[700];
  ztier_engine_options_t o;
  ztier_engine_t* e = NULL;
  ztier_store_t store;
  MakeConfig(yaml, sizeof(yaml), sub);
  snprintf(store_dir, sizeof(store_dir), "%s/%s_store", g_dir, sub);
  OK(ztier_engine_options_init(&o));
  o.config_text = yaml;
  o.rank = rank;
  o.world_size = world;
  o.device = ZTIER_DEVICE_HOST;
  if (group) {
    o.comm = ZTIER_COMM_LOCAL_GROUP;
    o.local_group = group;
  } else if (comm == kCommGlooPath) {
    o.comm = ZTIER_COMM_GLOO;
    o.gloo_store_path = store_dir;
  } else if (comm == kCommGlooStore) {
    store.context = store_dir;
    store.set = FileStoreSet;
    store.get = FileStoreGet;
    o.comm = ZTIER_COMM_GLOO;
    o.gloo_store = &store;
    o.gloo_prefix = "capi_test";
  }
  OK(ztier_engine_create(&o, &e));
  return e;
}

static ztier_engine_t* CreateEngine(const char* sub, uint32_t rank, uint32_t world,
                                    ztier_local_group_t* group) {
  return CreateEngineWith(sub, rank, world, group, kCommLocal);
}

/* Three parameters (numel 1000, 3000, 17: 17 is odd, so world 2 pads) and
 * three modules: a root (no params) with two children; param 2 is shared
 * by both children (a tied weight). */
enum { kParams = 3 };
static const uint64_t kNumel[kParams] = {1000, 3000, 17};

static float InitValue(int param, uint64_t i) { return (float)(param * 10000 + (int)i) * 0.5f; }

static void Register(ztier_engine_t* e, float** init) {
  for (int p = 0; p < kParams; ++p) {
    init[p] = malloc(kNumel[p] * sizeof(float));
    for (uint64_t i = 0; i < kNumel[p]; ++i) init[p][i] = InitValue(p, i);
    OK(ztier_param_register(e, (uint64_t)p, kNumel[p], ZTIER_DTYPE_FLOAT32, init[p]));
  }
  const uint64_t a[] = {0, 2}, b[] = {1, 2};
  OK(ztier_module_register(e, 100, "root", NULL, 0, -1));
  OK(ztier_module_register(e, 101, "root.a", a, 2, 100));
  OK(ztier_module_register(e, 102, "root.b", b, 2, 100));
}

/* Checks the full parameter's values against `want` (numel elements). */
static void CheckData(ztier_engine_t* e, int p, const float* want) {
  void* ptr = NULL;
  OK(ztier_param_data(e, (uint64_t)p, &ptr));
  CHECK(ptr != NULL);
  if (ptr) CHECK(memcmp(ptr, want, kNumel[p] * sizeof(float)) == 0);
}

static void ForwardBackward(ztier_engine_t* e, float** want) {
  OK(ztier_module_fetch(e, 100, 1));
  OK(ztier_module_fetch(e, 101, 1));
  CheckData(e, 0, want[0]);
  CheckData(e, 2, want[2]);
  OK(ztier_module_release(e, 101, 0));
  OK(ztier_module_fetch(e, 102, 1));
  CheckData(e, 1, want[1]);
  OK(ztier_module_release(e, 102, 0));
  OK(ztier_module_release(e, 100, 0));
  /* backward, in reverse */
  OK(ztier_module_fetch(e, 100, 0));
  OK(ztier_module_fetch(e, 102, 0));
  CheckData(e, 1, want[1]);
  OK(ztier_module_release(e, 102, 1));
  OK(ztier_module_fetch(e, 101, 0));
  CheckData(e, 0, want[0]);
  OK(ztier_module_release(e, 101, 1));
  OK(ztier_module_release(e, 100, 1));
}

/* ------------------------------------------------------------ world 1 */

static void TestSingleRank(void) {
  ztier_engine_t* e = CreateEngine("single", 0, 1, NULL);
  float* want[kParams];
  if (!e) return;
  Register(e, want);
  for (int step = 0; step < 3; ++step) {
    ForwardBackward(e, want);
    /* Gradients: g = 1 + index; the mean over one rank is itself. */
    for (int p = kParams - 1; p >= 0; --p) {
      float* g = malloc(kNumel[p] * sizeof(float));
      float* gp = malloc(kNumel[p] * sizeof(float));
      for (uint64_t i = 0; i < kNumel[p]; ++i) g[i] = (float)(i + 1);
      OK(ztier_param_grad_reduce(e, (uint64_t)p, g));
      OK(ztier_grad_partition_read(e, (uint64_t)p, gp, kNumel[p] * sizeof(float)));
      CHECK(memcmp(g, gp, kNumel[p] * sizeof(float)) == 0);
      /* SGD with lr 0.25 on the partition (the whole param at world 1). */
      float* w = malloc(kNumel[p] * sizeof(float));
      OK(ztier_partition_read(e, (uint64_t)p, w, kNumel[p] * sizeof(float)));
      CHECK(memcmp(w, want[p], kNumel[p] * sizeof(float)) == 0);
      for (uint64_t i = 0; i < kNumel[p]; ++i) w[i] -= 0.25f * gp[i];
      OK(ztier_partition_write(e, (uint64_t)p, w, kNumel[p] * sizeof(float)));
      memcpy(want[p], w, kNumel[p] * sizeof(float));
      free(g);
      free(gp);
      free(w);
    }
    OK(ztier_step_end(e));
  }
  ztier_stats_t st;
  memset(&st, 0, sizeof(st));
  st.size = sizeof(st);
  OK(ztier_engine_stats(e, &st));
  CHECK(st.steps == 3);
  CHECK(st.grad_reduces == 9);
  CHECK(st.nvme_reads > 0);
  CHECK(st.nvme_bytes_written > 0);
  CHECK(st.trace_mode == 1); /* complete after the first step */
  CHECK(st.live_numel == 0);
  ztier_param_info_t info;
  info.size = sizeof(info);
  OK(ztier_param_info(e, 1, &info));
  CHECK(info.numel == 3000 && info.partition_numel == 3000 && info.partition_offset == 0);
  CHECK(info.dtype == ZTIER_DTYPE_FLOAT32 && info.state == ZTIER_PARAM_NOT_AVAILABLE);
  CHECK(info.has_grad == 1);
  /* Gradient partitions: write (e.g. clipped) and read back, then clear. */
  {
    float g[17], back[17];
    for (int i = 0; i < 17; ++i) g[i] = (float)i * 0.125f;
    OK(ztier_grad_partition_write(e, 2, g, sizeof(g)));
    OK(ztier_grad_partition_read(e, 2, back, sizeof(back)));
    CHECK(memcmp(g, back, sizeof(g)) == 0);
    OK(ztier_grad_clear(e));
    EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION,
                  ztier_grad_partition_read(e, 2, back, sizeof(back)),
                  "gradient read after grad_clear");
  }
  OK(ztier_release_all(e, 1));
  ztier_device_kind_t kind = ZTIER_DEVICE_AUTO;
  int32_t ordinal = 0;
  OK(ztier_engine_device(e, &kind, &ordinal));
  CHECK(kind == ZTIER_DEVICE_HOST && ordinal == -1);
  char line[256];
  OK(ztier_engine_describe(e, line, sizeof(line)));
  printf("engine: %s\n", line);
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(want[p]);
}

/* ------------------------------------------------------------ hints */

/* One forward-only step: root, then child `which` (101 or 102), hinted
 * right after root's fetch when `hint` is set. Returns the engine's
 * fetch_calls_with_demand after the child's fetch minus before it. */
static uint64_t BranchStep(ztier_engine_t* e, uint64_t which, int hint) {
  ztier_stats_t st;
  uint64_t before;
  memset(&st, 0, sizeof(st));
  st.size = sizeof(st);
  OK(ztier_module_fetch(e, 100, 1));
  if (hint) OK(ztier_module_hint(e, &which, 1));
  OK(ztier_engine_stats(e, &st));
  before = st.fetch_calls_with_demand;
  OK(ztier_module_fetch(e, which, 1));
  OK(ztier_engine_stats(e, &st));
  OK(ztier_module_release(e, which, 0));
  OK(ztier_module_release(e, 100, 0));
  OK(ztier_step_end(e));
  return st.fetch_calls_with_demand - before;
}

static void TestHints(void) {
  ztier_engine_t* e = CreateEngine("hints", 0, 1, NULL);
  float* want[kParams];
  ztier_stats_t st;
  const uint64_t unknown[] = {102, 999};
  if (!e) return;
  Register(e, want);
  /* Steps 0 and 1 run different children after root: the learned order
   * gets a choice slot there. */
  BranchStep(e, 101, 0);
  BranchStep(e, 102, 0);
  /* With the hint, the chosen child's parameters are gathered before its
   * fetch: no demand gather. */
  CHECK(BranchStep(e, 102, 1) == 0);
  CHECK(BranchStep(e, 101, 1) == 0);
  memset(&st, 0, sizeof(st));
  st.size = sizeof(st);
  OK(ztier_engine_stats(e, &st));
  CHECK(st.hints == 2);
  CHECK(st.hint_gathers > 0);
  CHECK(st.trace_mode == 1);
  CHECK(st.trace_orders == 1);
  /* Misuse: an unknown id takes nothing of the call; NULL ids. */
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_module_hint(e, unknown, 2), "hint of module 999");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_module_hint(e, NULL, 1), "hint ids NULL");
  OK(ztier_module_hint(e, NULL, 0));
  OK(ztier_engine_stats(e, &st));
  CHECK(st.hints == 2);
  /* A caller built against 0.1 passes the smaller struct: filled up to its
   * size, nothing written after it. */
  {
    unsigned char raw[sizeof(ztier_stats_t)];
    ztier_stats_t* old = (ztier_stats_t*)raw;
    const size_t v1 = offsetof(ztier_stats_t, fetch_calls_with_demand);
    memset(raw, 0xAB, sizeof(raw));
    old->size = v1;
    OK(ztier_engine_stats(e, old));
    CHECK(old->steps == 4);
    CHECK(old->size == v1);
    CHECK(raw[v1] == 0xAB && raw[sizeof(raw) - 1] == 0xAB);
    old->size = v1 + 8;
    EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_engine_stats(e, old),
                  "stats of an unknown size");
  }
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(want[p]);
}

/* ------------------------------------------------------------ misuse */

static void TestMisuse(void) {
  ztier_engine_options_t o;
  ztier_engine_t* e = NULL;
  void* ptr = NULL;
  float buf[4096];
  float* init[kParams];

  /* Handles and struct sizes, before any engine exists. */
  EXPECT_STATUS(ZTIER_STATUS_INVALID_HANDLE, ztier_module_fetch(NULL, 100, 1),
                "fetch on a NULL engine");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_HANDLE, ztier_param_data(NULL, 0, &ptr),
                "param_data on a NULL engine");
  OK(ztier_engine_destroy(NULL));
  OK(ztier_local_group_destroy(NULL));
  OK(ztier_engine_options_init(&o));
  o.size = sizeof(o) - 8;
  o.config_text = "{}";
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_engine_create(&o, &e),
                "create with a wrong options size");
  CHECK(e == NULL);
  OK(ztier_engine_options_init(&o));
  o.config_text = "tiers: {nvme: {buffer_cont: 4}}\n";
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "create with a misspelt config key");
  CHECK(strstr(ztier_last_error(), "buffer_count") != NULL);
  o.config_text = NULL;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "create without a config");
  o.config_path = "/nonexistent/ztier.yaml";
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_engine_create(&o, &e),
                "create from a missing file");
  o.config_path = NULL;
  o.config_text = "{}";
  o.world_size = 2;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "world 2 without a communicator");
  o.rank = 2;
  o.comm = ZTIER_COMM_LOCAL_GROUP;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "rank out of range");
  o.rank = 0;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_HANDLE, ztier_engine_create(&o, &e),
                "local comm without a group");
  o.comm = ZTIER_COMM_NCCL_COMM;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "nccl comm kind without an ncclComm_t");
  o.comm = ZTIER_COMM_GLOO;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                "gloo without a store");
  {
    ztier_store_t half = {NULL, FileStoreSet, NULL};
    o.gloo_store = &half;
    EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                  "gloo store without get");
    o.gloo_store_path = "/tmp";
    EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_engine_create(&o, &e),
                  "gloo with both a store path and a store");
    o.gloo_store = NULL;
    o.gloo_store_path = NULL;
  }
  /* A caller built against the header before the gloo fields. */
  OK(ztier_engine_options_init_sized(&o, offsetof(ztier_engine_options_t, gloo_store_path)));
  CHECK(o.size == offsetof(ztier_engine_options_t, gloo_store_path));
  o.config_text = "{}";
  OK(ztier_engine_create(&o, &e));
  OK(ztier_engine_destroy(e));
  e = NULL;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_engine_options_init_sized(&o, 12),
                "options init with an unknown size");
  CHECK(ztier_status_string((ztier_status_t)999)[0] != '\0');
  CHECK(strcmp(ztier_status_string(ZTIER_STATUS_NOT_FOUND), "ZTIER_STATUS_NOT_FOUND") == 0);

  e = CreateEngine("misuse", 0, 1, NULL);
  if (!e) return;
  Register(e, init);
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT,
                ztier_param_register(e, 0, 10, ZTIER_DTYPE_FLOAT32, buf),
                "register a parameter id twice");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT,
                ztier_param_register(e, 9, 10, (ztier_dtype_t)42, buf),
                "register with a bad dtype");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT,
                ztier_param_register(e, 9, 10, ZTIER_DTYPE_FLOAT32, NULL),
                "register without data");
  const uint64_t unknown[] = {77};
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_module_register(e, 200, "x", unknown, 1, -1),
                "module with an unknown param id");
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_module_register(e, 201, "x", NULL, 0, 555),
                "module with an unknown parent");
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_module_release(e, 101, 0),
                "release without fetch (before any)");
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_module_fetch(e, 999, 1),
                "fetch of an unregistered module");
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_param_data(e, 999, &ptr),
                "param_data of an unknown id");
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_param_data(e, 0, &ptr),
                "param_data of a released param");
  OK(ztier_module_fetch(e, 101, 1));
  OK(ztier_param_data(e, 0, &ptr));
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_module_release(e, 102, 0),
                "release without fetch");
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION,
                ztier_partition_write(e, 0, buf, 1000 * sizeof(float)),
                "partition write while fetched");
  OK(ztier_module_release(e, 101, 0));
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_param_data(e, 0, &ptr),
                "param_data after its release");
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION,
                ztier_param_register(e, 9, 10, ZTIER_DTYPE_FLOAT32, buf),
                "register after the first fetch");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_partition_read(e, 0, buf, 12),
                "partition read of the wrong size");
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_partition_read(e, 999, buf, 12),
                "partition read of an unknown id");
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION,
                ztier_grad_partition_read(e, 0, buf, 1000 * sizeof(float)),
                "gradient read before any gradient");
  EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND, ztier_param_grad_reduce(e, 999, buf),
                "gradient of an unknown id");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_param_grad_reduce(e, 0, NULL),
                "gradient NULL");
  ztier_stats_t st;
  st.size = 3;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_engine_stats(e, &st),
                "stats with a wrong size");
  ztier_param_info_t info;
  info.size = sizeof(info) + 1;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_param_info(e, 0, &info),
                "param_info with a wrong size");
  /* Still usable after all of that. */
  OK(ztier_module_fetch(e, 101, 1));
  CheckData(e, 0, init[0]);
  OK(ztier_module_release(e, 101, 0));
  OK(ztier_step_end(e));
  ztier_status_t async = ZTIER_STATUS_INTERNAL;
  char async_msg[512];
  OK(ztier_engine_async_error(e, &async, async_msg, sizeof(async_msg)));
  if (async != ZTIER_STATUS_OK) printf("unexpected async error: %s\n", async_msg);
  CHECK(async == ZTIER_STATUS_OK);

  OK(ztier_engine_destroy(e));
  EXPECT_STATUS(ZTIER_STATUS_INVALID_HANDLE, ztier_engine_destroy(e), "double destroy");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_HANDLE, ztier_module_fetch(e, 101, 1),
                "fetch on a destroyed engine");

  /* A parameter larger than the whole swap-buffer pool (4 x 4096 elements):
   * the store cannot be laid out, and the engine says it is unusable. */
  e = CreateEngine("toolarge", 0, 1, NULL);
  if (!e) return;
  {
    float* big = calloc(20000, sizeof(float));
    OK(ztier_param_register(e, 0, 20000, ZTIER_DTYPE_FLOAT32, big));
    OK(ztier_module_register(e, 0, "big", (const uint64_t[]){0}, 1, -1));
    ztier_status_t got = ztier_module_fetch(e, 0, 1);
    printf("misuse %-34s -> %-32s %s\n", "parameter larger than the pool",
           ztier_status_string(got), ztier_last_error());
    CHECK(got != ZTIER_STATUS_OK && got != ZTIER_STATUS_ENGINE_FAILED);
    EXPECT_STATUS(ZTIER_STATUS_ENGINE_FAILED, ztier_step_end(e), "a call after the lay-out failed");
    CHECK(strstr(ztier_last_error(), "destroy") != NULL);
    free(big);
  }
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(init[p]);
}

/* ------------------------------------------------------------ async error */

/* Overwrites the data area of every swap file in `dir` (past the header). */
static int CorruptSwapFiles(const char* dir) {
  DIR* d = opendir(dir);
  struct dirent* ent;
  int corrupted = 0;
  char junk[65536];
  memset(junk, 0x5a, sizeof(junk));
  if (!d) return 0;
  while ((ent = readdir(d)) != NULL) {
    char path[1024];
    struct stat sb;
    snprintf(path, sizeof(path), "%s/%s", dir, ent->d_name);
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
    int fd = open(path, O_WRONLY);
    if (fd < 0) continue;
    if (pwrite(fd, junk, sizeof(junk), 4096) == (ssize_t)sizeof(junk)) ++corrupted;
    fsync(fd);
    close(fd);
  }
  closedir(d);
  return corrupted;
}

static void TestBackgroundReadFailure(void) {
  ztier_engine_t* e = CreateEngine("async", 0, 1, NULL);
  float* init[kParams];
  char dir[600], msg[512];
  ztier_status_t async = ZTIER_STATUS_OK;
  if (!e) return;
  Register(e, init);
  ForwardBackward(e, init);
  OK(ztier_step_end(e)); /* the trace is complete: fetches now prefetch */
  snprintf(dir, sizeof(dir), "%s/async", g_dir);
  CHECK(CorruptSwapFiles(dir) > 0);
  ztier_status_t got = ztier_module_fetch(e, 100, 1);
  if (got == ZTIER_STATUS_OK) got = ztier_module_fetch(e, 101, 1);
  printf("misuse %-34s -> %-32s %s\n", "fetch after a corrupted read", ztier_status_string(got),
         ztier_last_error());
  CHECK(got == ZTIER_STATUS_CORRUPTION || got == ZTIER_STATUS_IO_ERROR);
  OK(ztier_engine_async_error(e, &async, msg, sizeof(msg)));
  printf("async error: %s %s\n", ztier_status_string(async), msg);
  CHECK(async == got);
  CHECK(msg[0] != '\0');
  OK(ztier_engine_clear_async_error(e));
  /* Cleared; read-ahead of the other (also corrupted) partitions may have
   * failed since, in the background, which is then the new first error. */
  OK(ztier_engine_async_error(e, &async, NULL, 0));
  CHECK(async == ZTIER_STATUS_OK || async == ZTIER_STATUS_CORRUPTION);
  /* The engine is usable: release what the failed fetch took. */
  (void)ztier_module_release(e, 101, 0);
  (void)ztier_module_release(e, 100, 0);
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(init[p]);
}

/* ------------------------------------------------------------ world 2 */

struct RankArgs {
  ztier_local_group_t* group;
  uint32_t rank;
  enum Comm comm;
};

static void* RankMain(void* arg) {
  struct RankArgs* a = arg;
  ztier_engine_t* e = CreateEngineWith(kCommSub[a->comm], a->rank, 2, a->group, a->comm);
  float* init[kParams];
  if (!e) return NULL;
  Register(e, init);
  for (int step = 0; step < 2; ++step) {
    ForwardBackward(e, init);
    for (int p = kParams - 1; p >= 0; --p) {
      ztier_param_info_t info;
      info.size = sizeof(info);
      OK(ztier_param_info(e, (uint64_t)p, &info));
      CHECK(info.partition_numel == (kNumel[p] + 1) / 2);
      CHECK(info.partition_offset == a->rank * info.partition_numel);
      /* rank r's gradient is (r + 1) x (i + 1): the mean is 1.5 x (i + 1). */
      float* g = malloc(kNumel[p] * sizeof(float));
      float* gp = malloc(info.partition_numel * sizeof(float));
      float* w = malloc(info.partition_numel * sizeof(float));
      for (uint64_t i = 0; i < kNumel[p]; ++i) g[i] = (float)((a->rank + 1) * (i + 1));
      OK(ztier_param_grad_reduce(e, (uint64_t)p, g));
      OK(ztier_grad_partition_read(e, (uint64_t)p, gp, info.partition_numel * sizeof(float)));
      OK(ztier_partition_read(e, (uint64_t)p, w, info.partition_numel * sizeof(float)));
      for (uint64_t k = 0; k < info.partition_numel; ++k) {
        const uint64_t i = info.partition_offset + k;
        const float want_g = i < kNumel[p] ? 1.5f * (float)(i + 1) : 0.0f;
        const float want_w = i < kNumel[p] ? init[p][i] : 0.0f;
        CHECK(gp[k] == want_g);
        CHECK(w[k] == want_w);
        w[k] -= 0.5f * gp[k];
      }
      OK(ztier_partition_write(e, (uint64_t)p, w, info.partition_numel * sizeof(float)));
      /* What every rank sees at the next gather. */
      for (uint64_t i = 0; i < kNumel[p]; ++i) init[p][i] -= 0.5f * 1.5f * (float)(i + 1);
      free(g);
      free(gp);
      free(w);
    }
    OK(ztier_step_end(e));
  }
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(init[p]);
  return NULL;
}

static void TestTwoRanks(void) {
  ztier_local_group_t* group = NULL;
  pthread_t threads[2];
  struct RankArgs args[2];
  OK(ztier_local_group_create(2, &group));
  for (uint32_t r = 0; r < 2; ++r) {
    args[r].group = group;
    args[r].rank = r;
    args[r].comm = kCommLocal;
    CHECK(pthread_create(&threads[r], NULL, RankMain, &args[r]) == 0);
  }
  for (int r = 0; r < 2; ++r) pthread_join(threads[r], NULL);
  OK(ztier_local_group_destroy(group));
}

/* The same two ranks as processes over gloo: every check runs in the child
 * and its exit status carries the outcome. The store's directory must exist
 * and be fresh (created here, under this run's directory). */
static void TestTwoProcesses(enum Comm comm) {
  char store_dir[700];
  pid_t pids[2];
  snprintf(store_dir, sizeof(store_dir), "%s/%s_store", g_dir, kCommSub[comm]);
  mkdir(store_dir, 0700);
  fflush(stdout);
  for (uint32_t r = 0; r < 2; ++r) {
    pids[r] = fork();
    if (pids[r] == 0) {
      struct RankArgs a = {NULL, r, comm};
      RankMain(&a);
      fflush(stdout);
      _exit(g_failures ? 1 : 0);
    }
  }
  for (int r = 0; r < 2; ++r) {
    int status = 0;
    CHECK(waitpid(pids[r], &status, 0) == pids[r]);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
      fprintf(stderr, "gloo rank %d (%s) failed: status %d\n", r, kCommSub[comm], status);
      ++g_failures;
    }
  }
}

static int RemoveEntry(const char* path, const struct stat* sb, int flag, struct FTW* ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* ------------------------------------------------------------ optimizer */

/* ztier's own AdamW with its state on NVMe (or host memory): misuse first,
 * then three steps checked against AdamW's first-step closed form and the
 * state read back, a parameter without a gradient left alone, and the
 * parameters the next fetch gathers equal to the partitions written. */
static void TestOptimizer(const char* tier) {
  char sub[64], yaml[2048], base[1024], opt_dir[700];
  ztier_engine_options_t o;
  ztier_engine_t* e = NULL;
  ztier_optimizer_options_t oo;
  ztier_optimizer_stats_t os;
  float* want[kParams];
  snprintf(sub, sizeof(sub), "optimizer_%s", tier);
  MakeConfig(base, sizeof(base), sub);
  snprintf(opt_dir, sizeof(opt_dir), "%s/%s_state", g_dir, sub);
  /* Sub-groups of 1500 elements: param 1 (3000) straddles two. */
  snprintf(yaml, sizeof(yaml),
           "%soptimizer: {tier: %s, paths: [\"%s\"], buffer_count: 2, sub_group_size: 1500,\n"
           "            threads: 2}\n",
           base, tier, opt_dir);
  OK(ztier_engine_options_init(&o));
  o.config_text = yaml;
  o.device = ZTIER_DEVICE_HOST;
  OK(ztier_engine_create(&o, &e));
  if (!e) return;
  Register(e, want);
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_optimizer_step(e, NULL),
                "optimizer step before create");
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_optimizer_options_init(NULL),
                "optimizer options init NULL");
  OK(ztier_optimizer_options_init(&oo));
  oo.size = 3;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_optimizer_create(e, &oo),
                "optimizer options size 3");
  OK(ztier_optimizer_options_init(&oo));
  oo.lr = -1;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_optimizer_create(e, &oo), "lr -1");
  CHECK(strstr(ztier_last_error(), "lr") != NULL);
  OK(ztier_optimizer_options_init(&oo));
  oo.lr = 0.01;
  oo.weight_decay = 0.1;
  OK(ztier_optimizer_create(e, &oo));
  EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_optimizer_create(e, &oo),
                "second optimizer");
  for (int step = 1; step <= 3; ++step) {
    ForwardBackward(e, want);
    for (int p = kParams - 1; p >= 0; --p) {
      float* g;
      /* Param 2 has no gradient in step 3: it must stay as it is. */
      if (step == 3 && p == 2) continue;
      g = malloc(kNumel[p] * sizeof(float));
      for (uint64_t i = 0; i < kNumel[p]; ++i) g[i] = (i % 2 ? 1.0f : -2.0f) * (float)(i + 1);
      OK(ztier_param_grad_reduce(e, (uint64_t)p, g));
      free(g);
    }
    OK(ztier_optimizer_step(e, step == 2 ? &oo : NULL));
    for (int p = 0; p < kParams; ++p) {
      const size_t bytes = kNumel[p] * sizeof(float);
      float* w = malloc(bytes);
      float* master = malloc(bytes);
      float* m = malloc(bytes);
      uint64_t changed = 0;
      OK(ztier_partition_read(e, (uint64_t)p, w, bytes));
      OK(ztier_optimizer_state_read(e, (uint64_t)p, ZTIER_STATE_MASTER, master, bytes));
      OK(ztier_optimizer_state_read(e, (uint64_t)p, ZTIER_STATE_EXP_AVG, m, bytes));
      CHECK(memcmp(w, master, bytes) == 0); /* fp32 parameters: the master itself */
      for (uint64_t i = 0; i < kNumel[p]; ++i) {
        const float g = (i % 2 ? 1.0f : -2.0f) * (float)(i + 1);
        if (step == 1) {
          /* Step 1 from zero moments: p*(1 - lr*wd) - lr*sign(g), and m = 0.1*g. */
          const float expect = want[p][i] * (1.0f - 0.01f * 0.1f) - 0.01f * (g > 0 ? 1.0f : -1.0f);
          const float diff = w[i] - expect;
          CHECK(diff < 1e-5f * (1.0f + (expect > 0 ? expect : -expect)) &&
                -diff < 1e-5f * (1.0f + (expect > 0 ? expect : -expect)));
          CHECK(m[i] == g * 0.1f);
        } else if (step == 3 && p == 2) {
          CHECK(w[i] == want[p][i]); /* no gradient: untouched */
        } else {
          changed += w[i] != want[p][i]; /* decay and step may cancel exactly */
        }
      }
      if (step > 1 && !(step == 3 && p == 2)) CHECK(changed > kNumel[p] / 2);
      memcpy(want[p], w, bytes); /* the next fetch must gather these */
      free(w);
      free(master);
      free(m);
    }
    OK(ztier_grad_clear(e));
    OK(ztier_step_end(e));
  }
  ForwardBackward(e, want);
  OK(ztier_step_end(e));
  memset(&os, 0, sizeof(os));
  os.size = sizeof(os);
  OK(ztier_optimizer_stats(e, &os));
  CHECK(os.step == 3);
  CHECK(os.elements == 1000 + 3000 + 17);
  CHECK(os.sub_groups == 3);
  CHECK(os.bytes_read > 0 && os.bytes_read == os.bytes_written);
  CHECK(os.peak_buffers >= 1 && os.peak_buffers <= 2);
  os.size = 1;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_optimizer_stats(e, &os), "stats size 1");
  {
    float tmp[17];
    EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT,
                  ztier_optimizer_state_read(e, 2, (ztier_state_array_t)7, tmp, sizeof(tmp)),
                  "state array 7");
    EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT,
                  ztier_optimizer_state_read(e, 2, ZTIER_STATE_EXP_AVG_SQ, tmp, 4),
                  "state read 4 bytes");
    EXPECT_STATUS(ZTIER_STATUS_NOT_FOUND,
                  ztier_optimizer_state_read(e, 99, ZTIER_STATE_MASTER, tmp, sizeof(tmp)),
                  "state of unknown param");
  }
  oo.kind = ZTIER_OPTIMIZER_ADAM;
  EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_optimizer_step(e, &oo), "switch to Adam");
  if (strcmp(tier, "nvme") == 0) {
    /* Both slots of sub-group 0 altered behind ztier's back: the next step
     * reports corruption and changes nothing (the step count stays 3). */
    char file[800];
    int fd;
    const uint64_t slot0 = 4096 + 4096 + 64, slot1 = 4096 + os.slot_bytes + 4096 + 64;
    snprintf(file, sizeof(file), "%s/ztier-optimizer-rank0-of1.swp", opt_dir);
    fd = open(file, O_RDWR);
    CHECK(fd >= 0);
    if (fd >= 0) {
      CHECK(pwrite(fd, "garbage!", 8, (off_t)slot0) == 8);
      CHECK(pwrite(fd, "garbage!", 8, (off_t)slot1) == 8);
      close(fd);
    }
    EXPECT_STATUS(ZTIER_STATUS_CORRUPTION, ztier_optimizer_step(e, NULL),
                  "optimizer state altered on disk");
    CHECK(strstr(ztier_last_error(), "sub-group 0") != NULL);
    CHECK(strstr(ztier_last_error(), "stored state of step 3 is damaged") != NULL);
    os.size = sizeof(os);
    OK(ztier_optimizer_stats(e, &os));
    CHECK(os.step == 3);
  }
  OK(ztier_engine_destroy(e));
  for (int p = 0; p < kParams; ++p) free(want[p]);
}

/* ------------------------------------------------------------ gradients */

/* An engine over the three parameters with gradients on `tier` and ztier's
 * optimizer (lr 0.01, no decay; `scale` its grad_scale), created at once
 * unless `no_optimizer`. */
static ztier_engine_t* GradEngine(const char* tier, const char* sub, float** want,
                                  int no_optimizer) {
  char yaml[2048], path[700];
  ztier_engine_options_t o;
  ztier_engine_t* e = NULL;
  snprintf(path, sizeof(path), "%s/%s", g_dir, sub);
  snprintf(yaml, sizeof(yaml),
           "tiers:\n"
           "  params: nvme\n"
           "  gradients: %s\n"
           "  host: {pin_memory: false}\n"
           "  nvme: {paths: [\"%s\"], buffer_count: 4, buffer_size: 4096,\n"
           "         buffer_element_bytes: 4}\n"
           "coordinator: {param_persistence_threshold: 0, max_reuse_distance: 0}\n"
           "io: {register_buffers: false}\n"
           "optimizer: {buffer_count: 2, sub_group_size: 1500, threads: 1}\n",
           tier, path);
  OK(ztier_engine_options_init(&o));
  o.config_text = yaml;
  o.device = ZTIER_DEVICE_HOST;
  OK(ztier_engine_create(&o, &e));
  if (!e) return NULL;
  Register(e, want);
  if (!no_optimizer) {
    ztier_optimizer_options_t oo;
    OK(ztier_optimizer_options_init(&oo));
    oo.lr = 0.01;
    oo.weight_decay = 0;
    OK(ztier_optimizer_create(e, &oo));
  }
  return e;
}

static float GradValue(int p, uint64_t i, int k) {
  return (float)((i % 7) + 1) * (k ? 0.375f : -1.25f) + (float)p;
}

/* Accumulation, the hand-in summary, grad_scale and the 0.1 options size,
 * with gradient partitions on `tier`. */
static void TestGradients(const char* tier) {
  char sub[64];
  float* want[kParams];
  float* want2[kParams];
  ztier_engine_t* e;
  ztier_engine_t* twin;
  ztier_grad_stats_t gs;
  double sq = 0;
  const int nvme = strcmp(tier, "nvme") == 0;
  if (nvme) {
    /* Without ztier's optimizer a gradient has no store to go to. */
    e = GradEngine(tier, "grads_no_opt", want, 1);
    if (!e) return;
    {
      float g[17] = {0};
      EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_param_grad_reduce(e, 2, g),
                    "nvme gradient without an optimizer");
      CHECK(strstr(ztier_last_error(), "tiers.gradients") != NULL);
    }
    OK(ztier_engine_destroy(e));
    for (int p = 0; p < kParams; ++p) free(want[p]);
  }
  snprintf(sub, sizeof(sub), "grads_%s", tier);
  e = GradEngine(tier, sub, want, 0);
  snprintf(sub, sizeof(sub), "grads_%s_twin", tier);
  twin = GradEngine(tier, sub, want2, 0);
  if (!e || !twin) return;
  for (int p = kParams - 1; p >= 0; --p) {
    const size_t bytes = kNumel[p] * sizeof(float);
    float* g0 = malloc(bytes);
    float* g1 = malloc(bytes);
    float* half = malloc(bytes);
    float* back = malloc(bytes);
    for (uint64_t i = 0; i < kNumel[p]; ++i) {
      g0[i] = GradValue(p, i, 0);
      g1[i] = GradValue(p, i, 1);
    }
    OK(ztier_param_grad_accumulate(e, (uint64_t)p, g0)); /* none held: a plain hand-in */
    OK(ztier_param_grad_accumulate(e, (uint64_t)p, g1));
    OK(ztier_grad_partition_read(e, (uint64_t)p, back, bytes));
    for (uint64_t i = 0; i < kNumel[p]; ++i) {
      const float sum = g0[i] + g1[i];
      CHECK(back[i] == sum);
      sq += (double)sum * (double)sum;
      half[i] = sum * 0.5f; /* exact: a power of two */
    }
    OK(ztier_param_grad_reduce(twin, (uint64_t)p, half));
    free(g0);
    free(g1);
    free(half);
    free(back);
  }
  gs.size = sizeof(gs);
  OK(ztier_grad_stats(e, &gs));
  CHECK(gs.count == kParams && !gs.nonfinite);
  CHECK(gs.tier == (nvme ? ZTIER_GRAD_TIER_NVME : ZTIER_GRAD_TIER_HOST));
  CHECK(gs.sq_norm > 0.999999 * sq && gs.sq_norm < 1.000001 * sq);
  gs.size = 2;
  EXPECT_STATUS(ZTIER_STATUS_BAD_STRUCT_SIZE, ztier_grad_stats(e, &gs), "grad stats size 2");
  if (nvme) {
    ztier_optimizer_options_t oo;
    OK(ztier_optimizer_options_init(&oo));
    EXPECT_STATUS(ZTIER_STATUS_FAILED_PRECONDITION, ztier_optimizer_step_begin(e, &oo, 1),
                  "begin with gradients on NVMe");
  }
  {
    /* grad_scale 0.5 on the sums equals scale 1 on the halves; the twin's
     * options have 0.1's size (no grad_scale field: 1). */
    ztier_optimizer_options_t oo;
    OK(ztier_optimizer_options_init(&oo));
    oo.lr = 0.01;
    oo.weight_decay = 0;
    oo.grad_scale = 0.5;
    OK(ztier_optimizer_step(e, &oo));
    oo.grad_scale = 77; /* not read: */
    oo.size = offsetof(ztier_optimizer_options_t, grad_scale);
    OK(ztier_optimizer_step(twin, &oo));
    for (int p = 0; p < kParams; ++p) {
      const size_t bytes = kNumel[p] * sizeof(float);
      float* a = malloc(bytes);
      float* b = malloc(bytes);
      OK(ztier_partition_read(e, (uint64_t)p, a, bytes));
      OK(ztier_partition_read(twin, (uint64_t)p, b, bytes));
      CHECK(memcmp(a, b, bytes) == 0);
      CHECK(memcmp(a, want[p], bytes) != 0);
      free(a);
      free(b);
    }
    oo.size = sizeof(oo);
    oo.grad_scale = -1;
    EXPECT_STATUS(ZTIER_STATUS_INVALID_ARGUMENT, ztier_optimizer_step(e, &oo), "grad_scale -1");
  }
  {
    /* A non-finite element is seen at hand-in; clear forgets everything. */
    float g[17];
    for (int i = 0; i < 17; ++i) g[i] = 1.0f;
    g[5] = 1.0f / 0.0f;
    OK(ztier_param_grad_accumulate(e, 2, g));
    gs.size = sizeof(gs);
    OK(ztier_grad_stats(e, &gs));
    CHECK(gs.nonfinite && gs.count >= 1);
    OK(ztier_grad_clear(e));
    OK(ztier_grad_stats(e, &gs));
    CHECK(gs.count == 0 && gs.sq_norm == 0 && !gs.nonfinite);
  }
  OK(ztier_engine_destroy(e));
  OK(ztier_engine_destroy(twin));
  for (int p = 0; p < kParams; ++p) {
    free(want[p]);
    free(want2[p]);
  }
}

int main(void) {
  const char* tmp = getenv("ZTIER_TEST_TMPDIR");
  uint32_t major = 0, minor = 0, patch = 0;
  snprintf(g_dir, sizeof(g_dir), "%s/capi_test_%d", tmp ? tmp : ".", (int)getpid());
  mkdir(tmp ? tmp : ".", 0700);
  mkdir(g_dir, 0700);

  OK(ztier_version(&major, &minor, &patch));
  CHECK(major == ZTIER_VERSION_MAJOR && minor == ZTIER_VERSION_MINOR &&
        patch == ZTIER_VERSION_PATCH);
  CHECK(strcmp(ztier_version_string(), ZTIER_VERSION_STRING) == 0);
  printf("ztier %s (header %s)\n", ztier_version_string(), ZTIER_VERSION_STRING);

  /* Processes first: fork before this process has started any threads. */
  TestTwoProcesses(kCommGlooPath);
  TestTwoProcesses(kCommGlooStore);
  TestMisuse();
  TestSingleRank();
  TestHints();
  TestTwoRanks();
  TestBackgroundReadFailure();
  TestOptimizer("nvme");
  TestOptimizer("host");
  TestGradients("host");
  TestGradients("nvme");
  nftw(g_dir, RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
  if (g_failures) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("all C API checks passed\n");
  return 0;
}
