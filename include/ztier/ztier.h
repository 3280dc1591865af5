/*
 * ztier.h: the C API of ztier, the only header a trainer includes.
 *
 * ztier keeps each rank's 1/world slice (partition) of every registered
 * parameter on a tier (NVMe, or host memory) and brings full parameters onto
 * the device around the modules that use them. A trainer drives it from its
 * hooks: module_fetch before a module runs, module_release after it, the full
 * gradient of each parameter after its backward, an optimizer update through
 * the partition read/write calls (or ztier's own pipelined optimizer step,
 * ztier_optimizer_step), and step_end once per step. docs/c_api.md
 * walks through one training step.
 *
 * Conventions
 *  - Every call returns a ztier_status_t; results come back through pointer
 *    arguments, which are written only on success. A few queries that cannot
 *    fail return their value directly (status strings, last error, version
 *    string); each says so.
 *  - On failure, ztier_last_error() gives the detail on the calling thread.
 *  - No C++ exception ever crosses this boundary.
 *  - Structs that may grow start with `size`: set it to sizeof the struct
 *    you compiled against (the *_init functions do). A size ztier does not
 *    know is ZTIER_STATUS_BAD_STRUCT_SIZE.
 *  - Ids (parameters, modules) are chosen by the caller, unique per kind.
 *  - Sizes are elements unless a name ends in _bytes.
 *
 * Ownership: the engine owns every buffer it hands out (param_data
 * pointers); the caller owns every buffer it passes in and may reuse it once
 * the call returns.
 *
 * Thread-safety: each call says. In short: calls on one engine are
 * serialised by the engine (one caller at a time, in practice the training
 * thread); different engines (ranks in one process) are independent;
 * ztier_engine_stats, ztier_engine_async_error and ztier_engine_device may
 * be called from any thread at any time (but not while the engine is being
 * destroyed); ztier_status_string, ztier_version* are always safe.
 */
#ifndef ZTIER_ZTIER_H_
#define ZTIER_ZTIER_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define ZTIER_API __attribute__((visibility("default")))
#else
#define ZTIER_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- version */

/* Compile-time version of this header. */
#define ZTIER_VERSION_MAJOR 0
#define ZTIER_VERSION_MINOR 2
#define ZTIER_VERSION_PATCH 0
#define ZTIER_VERSION_STRING "0.2.0"
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define ZTIER_VERSION_NUMBER \
  (ZTIER_VERSION_MAJOR * 10000 + ZTIER_VERSION_MINOR * 100 + ZTIER_VERSION_PATCH)

/* ------------------------------------------------------------- status */

typedef enum ztier_status {
  ZTIER_STATUS_OK = 0,
  ZTIER_STATUS_INVALID_ARGUMENT = 1,    /* a bad argument, config or dtype */
  ZTIER_STATUS_NOT_FOUND = 2,           /* unknown parameter / module id, missing file */
  ZTIER_STATUS_IO_ERROR = 3,            /* the OS or a device failed */
  ZTIER_STATUS_UNAVAILABLE = 4,         /* a backend (CUDA, NCCL) is not present */
  ZTIER_STATUS_RESOURCE_EXHAUSTED = 5,  /* out of memory, swap buffers, disk */
  ZTIER_STATUS_FAILED_PRECONDITION = 6, /* not valid in the current state */
  ZTIER_STATUS_CORRUPTION = 7,          /* data on NVMe failed its checksum */
  ZTIER_STATUS_CANCELLED = 8,           /* cancelled on shutdown */
  ZTIER_STATUS_INTERNAL = 9,            /* a bug in ztier */
  ZTIER_STATUS_INVALID_HANDLE = 10,     /* a NULL, destroyed or foreign handle */
  ZTIER_STATUS_BAD_STRUCT_SIZE = 11,    /* a struct's size field is not one ztier knows */
  ZTIER_STATUS_ENGINE_FAILED = 12,      /* an earlier error left the engine unusable:
                                           only ztier_engine_destroy is valid */
  ZTIER_STATUS_COUNT                    /* number of statuses (not a status) */
} ztier_status_t;

/* Static text naming `status` ("ZTIER_STATUS_NOT_FOUND"); "unknown status" for
 * values outside [0, ZTIER_STATUS_COUNT). Never NULL. Thread-safe. */
ZTIER_API const char* ztier_status_string(ztier_status_t status);

/* The detail of the most recent failed call on this thread (which call,
 * what was wrong, how to fix it); "" when the thread has had no failure.
 * Successful calls leave it alone (as errno). Valid until the next failed
 * call on this thread. Never NULL. */
ZTIER_API const char* ztier_last_error(void);

/* Run-time version (of the loaded library). Any pointer may be NULL.
 * Thread-safe. */
ZTIER_API ztier_status_t ztier_version(uint32_t* major, uint32_t* minor,
                                       uint32_t* patch);
/* "0.2.0": the loaded library's version. Never NULL. Thread-safe. */
ZTIER_API const char* ztier_version_string(void);

/* ------------------------------------------------------------- types */

typedef struct ztier_engine ztier_engine_t;            /* one rank's engine */
typedef struct ztier_local_group ztier_local_group_t;  /* ranks as threads */

typedef enum ztier_dtype {
  ZTIER_DTYPE_FLOAT32 = 0,
  ZTIER_DTYPE_FLOAT16 = 1,
  ZTIER_DTYPE_BFLOAT16 = 2,
  ZTIER_DTYPE_UINT8 = 3 /* no gradients */
} ztier_dtype_t;

typedef enum ztier_comm_kind {
  ZTIER_COMM_NONE = 0,            /* world size 1 */
  ZTIER_COMM_LOCAL_GROUP = 1,     /* ranks are threads of this process */
  ZTIER_COMM_NCCL_UNIQUE_ID = 2,  /* NCCL from rank 0's ncclUniqueId bytes */
  ZTIER_COMM_NCCL_COMM = 3,       /* an existing ncclComm_t (not owned; it
                                     must outlive the engine) */
  ZTIER_COMM_GLOO = 4             /* ranks are processes (CPU, host memory),
                                     on one machine or many: gloo over TCP */
} ztier_comm_kind_t;

typedef enum ztier_device_kind {
  ZTIER_DEVICE_AUTO = 0, /* CUDA when present (and comm is not local) */
  ZTIER_DEVICE_HOST = 1, /* host emulation: device pointers are host memory */
  ZTIER_DEVICE_CUDA = 2
} ztier_device_kind_t;

typedef enum ztier_param_state {
  ZTIER_PARAM_NOT_AVAILABLE = 0, /* only the partition exists (on its tier) */
  ZTIER_PARAM_INFLIGHT = 1,      /* being read / gathered */
  ZTIER_PARAM_AVAILABLE = 2      /* the full parameter is on the device */
} ztier_param_state_t;

/* ------------------------------------------------------------- local group */

/* A group of `world_size` ranks that run as threads of this process (the
 * "local" collective over host memory): create one, pass it to every rank's
 * engine, destroy it after the engines. Thread-safe. */
ZTIER_API ztier_status_t ztier_local_group_create(uint32_t world_size,
                                                  ztier_local_group_t** out);
/* NULL is a no-op. Engines keep what they need; destroy may precede them. */
ZTIER_API ztier_status_t ztier_local_group_destroy(ztier_local_group_t* group);

/* ------------------------------------------------------------- store */

/* A key-value store every rank reaches (ZTIER_COMM_GLOO): each rank publishes
 * its TCP address under a key and reads the others'. Any store works:
 * torch.distributed's (ztier.torch passes it), Redis, a database. Called only
 * inside ztier_engine_create, from the calling thread. */
typedef struct ztier_store {
  void* context; /* passed back to both calls */
  /* Stores `bytes` bytes at `value` under `key` (NUL-terminated), replacing
   * any value. Returns 0, or nonzero on failure. */
  int (*set)(void* context, const char* key, const void* value, size_t bytes);
  /* Waits up to `timeout_ms` for `key` to exist. Then copies min(capacity,
   * size) bytes of its value to `value`, sets `*bytes` to its size and
   * returns 0 (ztier calls again with a larger buffer when *bytes >
   * capacity). Returns 1 if the wait timed out, another value on failure. */
  int (*get)(void* context, const char* key, void* value, size_t capacity, size_t* bytes,
             uint32_t timeout_ms);
} ztier_store_t;

/* ------------------------------------------------------------- engine */

typedef struct ztier_engine_options {
  size_t size; /* sizeof(ztier_engine_options_t) */
  /* Exactly one of the two: a YAML file, or YAML text (docs/config.md). */
  const char* config_path;
  const char* config_text;
  uint32_t rank;       /* 0 <= rank < world_size */
  uint32_t world_size; /* >= 1 */
  ztier_comm_kind_t comm;
  ztier_local_group_t* local_group; /* ZTIER_COMM_LOCAL_GROUP */
  const void* nccl_unique_id;       /* ZTIER_COMM_NCCL_UNIQUE_ID: 128 bytes */
  size_t nccl_unique_id_bytes;
  void* nccl_comm;                  /* ZTIER_COMM_NCCL_COMM: an ncclComm_t */
  ztier_device_kind_t device;
  int32_t cuda_device; /* ordinal, ZTIER_DEVICE_CUDA / AUTO */
  /* ZTIER_COMM_GLOO: how the ranks find each other, exactly one of:
   * a directory every rank sees (one host, or a filesystem shared by the
   * hosts) that no earlier group used with the same prefix (its keys stay
   * there), or a store (above). The timeout is the config's comm.timeout. */
  const char* gloo_store_path;
  const ztier_store_t* gloo_store;
  const char* gloo_prefix; /* prepended to every key; NULL: "ztier" */
} ztier_engine_options_t;

/* Sets `size` and the defaults (world 1, rank 0, no comm, device auto).
 * NULL is ZTIER_STATUS_INVALID_ARGUMENT. Thread-safe. A macro: it passes
 * the size of the struct the caller was compiled with, so a program built
 * against an earlier header (without the gloo fields) keeps working. */
ZTIER_API ztier_status_t ztier_engine_options_init_sized(ztier_engine_options_t* options,
                                                         size_t size);
#define ztier_engine_options_init(options) \
  ztier_engine_options_init_sized((options), sizeof(*(options)))
/* The exported function programs built against the earlier header call:
 * it fills only the fields that header had. */
ZTIER_API ztier_status_t(ztier_engine_options_init)(ztier_engine_options_t* options);

/* Builds one rank's engine from the config: device backend, collective,
 * swap buffers, I/O engine, NVMe store. Ranks of one group create their
 * engines concurrently (each on its own thread). Thread-safe. */
ZTIER_API ztier_status_t ztier_engine_create(const ztier_engine_options_t* options,
                                             ztier_engine_t** out);

/* Drains what is in flight and frees the engine's memory and buffers (the
 * NVMe swap files stay; the next engine on the same paths truncates them).
 * NULL is a no-op (ZTIER_STATUS_OK). Not concurrently with another call on
 * the same engine. A handle already destroyed is ZTIER_STATUS_INVALID_HANDLE
 * (every call checks its handle against the live engines; a stale handle is
 * caught unless a new engine got the same address). */
ZTIER_API ztier_status_t ztier_engine_destroy(ztier_engine_t* engine);

/* ------------------------------------------------------------- set-up */

/* Registers parameter `id` of `numel` elements of `dtype`. `full_data`
 * (host memory, numel elements) is its initial value: the engine keeps
 * this rank's partition, p = ceil(numel / world) elements starting at
 * rank * p (zero padded), and puts it on the configured tier. Register
 * every parameter before the first fetch, step_end or partition call (the
 * first of those lays out the NVMe store; until then the partition waits in
 * host memory). The caller may free `full_data` when the call returns.
 * Serialised per engine. */
ZTIER_API ztier_status_t ztier_param_register(ztier_engine_t* engine, uint64_t id,
                                              uint64_t numel, ztier_dtype_t dtype,
                                              const void* full_data);

/* Registers module `id` (`name` for messages, may be NULL) using the
 * parameters `param_ids[0..param_count)`, all registered before (a module
 * may have none). `parent` is the id of an already registered module, or -1.
 * The same parameter may belong to several modules (tied weights).
 * Serialised per engine. */
ZTIER_API ztier_status_t ztier_module_register(ztier_engine_t* engine, uint64_t id,
                                               const char* name,
                                               const uint64_t* param_ids,
                                               size_t param_count, int64_t parent);

/* ------------------------------------------------------------- hooks */

/* Before module `id` runs (forward, or backward when `forward` is 0): makes
 * each of its parameters AVAILABLE (waits for in-flight reads and gathers,
 * demand-fetches the rest) and prefetches what the recorded trace needs
 * next. Every rank calls the same fetches in the same order. A failed
 * background read for one of its parameters is returned here (and by
 * ztier_engine_async_error). Serialised per engine. */
ZTIER_API ztier_status_t ztier_module_fetch(ztier_engine_t* engine, uint64_t id,
                                            int forward);

/* The modules that run next, when the trainer knows them before the trace
 * can: e.g. the experts a router chose, right after the router ran. They
 * take the next choice slots of the learned trace (positions where steps
 * ran different modules) and their parameters are prefetched now, within
 * max_live_parameters and prefetch_bucket_size. Modules with no choice slot
 * ahead, and hints before the first step has been learned, are ignored. A
 * hint is a prediction only: a module fetched that was not hinted is
 * fetched as usual. Every rank gives the same hints at the same place (they
 * issue all-gathers). Unknown ids are ZTIER_STATUS_NOT_FOUND, and then no
 * id of the call is taken. Serialised per engine. Since 0.2. */
ZTIER_API ztier_status_t ztier_module_hint(ztier_engine_t* engine, const uint64_t* ids,
                                           size_t count);

/* After module `id` ran: its parameters that no other active module uses,
 * that are not persistent and not needed again soon are freed. A release
 * without a matching fetch is ZTIER_STATUS_FAILED_PRECONDITION. Serialised
 * per engine. */
ZTIER_API ztier_status_t ztier_module_release(ztier_engine_t* engine, uint64_t id,
                                              int backward);

/* The device pointer of AVAILABLE parameter `id` (numel elements, then
 * padding), valid until the release that frees it. Host memory on the host
 * emulation, CUDA device memory on CUDA. A parameter that is not AVAILABLE
 * is ZTIER_STATUS_FAILED_PRECONDITION. Serialised per engine. */
ZTIER_API ztier_status_t ztier_param_data(ztier_engine_t* engine, uint64_t id,
                                          void** out);

/* Hands in parameter `id`'s full gradient after its backward: `full_grad`
 * (device memory, numel elements of its dtype, complete: synchronise the
 * stream that produced it first). ztier reduce-scatters it, averaged over
 * the ranks, and keeps this rank's partition of the mean (p elements) for
 * the optimizer, replacing the previous one. Every rank hands in the same
 * gradients in the same order (it is a collective). Gradient partitions
 * live on config tiers.gradients: host memory, or NVMe (the optimizer's
 * gradient store: ztier's optimizer must exist first; the write goes on in
 * the background and the call returns once `full_grad` may be reused).
 * Serialised per engine. */
ZTIER_API ztier_status_t ztier_param_grad_reduce(ztier_engine_t* engine, uint64_t id,
                                                 const void* full_grad);

/* As ztier_param_grad_reduce, but adds the reduced partition to the one
 * held (handed in since the last ztier_grad_clear / optimizer step), as
 * torch accumulates .grad over micro-batches: one addition per element in
 * the parameter's type. With none held it is ztier_param_grad_reduce. */
ZTIER_API ztier_status_t ztier_param_grad_accumulate(ztier_engine_t* engine, uint64_t id,
                                                     const void* full_grad);

typedef enum ztier_grad_tier {
  ZTIER_GRAD_TIER_HOST = 0,
  ZTIER_GRAD_TIER_NVME = 1
} ztier_grad_tier_t;

/* This rank's gradient partitions as held now, summarised when each was
 * handed in (no pass over them here): for gradient clipping (the global
 * norm is the square root of the sum of every rank's sq_norm) and loss
 * scaling (skip the step when any rank has nonfinite). */
typedef struct ztier_grad_stats {
  size_t size;        /* sizeof(ztier_grad_stats_t) */
  double sq_norm;     /* sum of squares of every element, in double */
  uint64_t count;     /* parameters with a gradient partition */
  int nonfinite;      /* some element is inf or NaN */
  ztier_grad_tier_t tier; /* where the partitions live (config tiers.gradients) */
} ztier_grad_stats_t;

/* Fills `stats` (set stats->size first). Serialised per engine. */
ZTIER_API ztier_status_t ztier_grad_stats(ztier_engine_t* engine, ztier_grad_stats_t* stats);

/* Exchanges one 64-bit value with every rank: `out[r]` is rank r's
 * (`out_count` >= the world size). A collective: every rank calls it at the
 * same place among the others (it runs after everything in flight). For
 * small agreements, e.g. which parameters got a gradient on any rank, so
 * that every rank hands in the same ones. Serialised per engine. */
ZTIER_API ztier_status_t ztier_exchange_u64(ztier_engine_t* engine, uint64_t value,
                                            uint64_t* out, size_t out_count);

/* Ends a training step: waits for everything in flight; after the first
 * step the recorded trace is checked across ranks and drives prefetching.
 * Serialised per engine. */
ZTIER_API ztier_status_t ztier_step_end(ztier_engine_t* engine);

/* Frees every full parameter that is not persistent (all of them with
 * `persistent` set), e.g. before evaluation. Serialised per engine. */
ZTIER_API ztier_status_t ztier_release_all(ztier_engine_t* engine, int persistent);

/* ------------------------------------------------------------- optimizer */

typedef struct ztier_param_info {
  size_t size; /* sizeof(ztier_param_info_t) */
  uint64_t numel;           /* elements of the full parameter */
  uint64_t partition_numel; /* p: elements of each rank's partition */
  uint64_t partition_offset; /* rank * p: where this rank's slice starts */
  ztier_dtype_t dtype;
  ztier_param_state_t state;
  int has_grad; /* a gradient partition has been handed in */
} ztier_param_info_t;

/* Fills `info` (set info->size first). Serialised per engine. */
ZTIER_API ztier_status_t ztier_param_info(ztier_engine_t* engine, uint64_t id,
                                          ztier_param_info_t* info);

/* Copies this rank's partition of parameter `id` (partition_numel elements,
 * `bytes` must equal partition_numel * element size) between its tier and
 * host memory. Valid while no active module uses it; a write frees a full
 * parameter still held (the next fetch gathers the new values). Serialised
 * per engine. */
ZTIER_API ztier_status_t ztier_partition_read(ztier_engine_t* engine, uint64_t id,
                                              void* out, size_t bytes);
ZTIER_API ztier_status_t ztier_partition_write(ztier_engine_t* engine, uint64_t id,
                                               const void* in, size_t bytes);

/* This rank's gradient partition of `id` (as ztier_partition_read), from
 * the last ztier_param_grad_reduce. Reading one never handed in is
 * ZTIER_STATUS_FAILED_PRECONDITION. A write replaces it (e.g. clipping);
 * ztier_grad_clear forgets them all. Serialised per engine. */
ZTIER_API ztier_status_t ztier_grad_partition_read(ztier_engine_t* engine, uint64_t id,
                                                   void* out, size_t bytes);
ZTIER_API ztier_status_t ztier_grad_partition_write(ztier_engine_t* engine, uint64_t id,
                                                    const void* in, size_t bytes);
ZTIER_API ztier_status_t ztier_grad_clear(ztier_engine_t* engine);

/* ------------------------------------------------------------- optimizer step */

/* The optimizer ztier runs itself, with its state (fp32 master weights and
 * Adam's two moments, 12 bytes per element) on the tier config.optimizer
 * names (NVMe by default), streamed through in sub-groups: each step reads a
 * sub-group's state, updates it on the CPU (AVX-512 / AVX2 when present),
 * writes it back and writes the updated parameter partition, with the next
 * reads and the previous writes in flight. docs/c_api.md shows a step. */

typedef enum ztier_optimizer_kind {
  ZTIER_OPTIMIZER_ADAMW = 0, /* decoupled weight decay, as torch.optim.AdamW */
  ZTIER_OPTIMIZER_ADAM = 1   /* L2 weight decay added to the gradient, as torch.optim.Adam */
} ztier_optimizer_kind_t;

typedef struct ztier_optimizer_options {
  size_t size; /* sizeof(ztier_optimizer_options_t) */
  ztier_optimizer_kind_t kind;
  double lr;           /* >= 0 */
  double beta1, beta2; /* in [0, 1) */
  double eps;          /* > 0 */
  double weight_decay; /* >= 0 */
  int bias_correction; /* non-zero: Adam's bias correction (torch's behaviour) */
  /* Multiplies every gradient before the update (>= 0, finite): 1 / the loss
   * scale, a clipping coefficient. Since 0.2; a struct of 0.1's size (without
   * it) is still accepted and means 1. */
  double grad_scale;
} ztier_optimizer_options_t;

/* Sets `size` and torch.optim.AdamW's defaults: AdamW, lr 1e-3, betas
 * (0.9, 0.999), eps 1e-8, weight_decay 0.01, bias correction on, grad_scale 1. NULL is
 * ZTIER_STATUS_INVALID_ARGUMENT. Thread-safe. */
ZTIER_API ztier_status_t ztier_optimizer_options_init(ztier_optimizer_options_t* options);

/* Creates the engine's optimizer over every registered float parameter
 * (uint8 ones have no gradient and are left out), in registration order:
 * lays out its state store and writes step 0 (master = the current
 * partition, moments zero). Once per engine, after every parameter is
 * registered (it lays out the parameter store too). Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_create(ztier_engine_t* engine,
                                                const ztier_optimizer_options_t* options);

/* The same optimizer with torch's parameter groups: `groups[0..group_count)`
 * are the groups' hyperparameters (one kind for all), and parameter
 * `param_ids[i]` belongs to group `param_groups[i]`. Only the listed
 * parameters get optimizer state (e.g. frozen ones are left out); each is a
 * registered float parameter, listed once. The state is laid out in
 * registration order, whatever the order of the list. ztier_optimizer_create
 * is this call with one group holding every float parameter. At most 65536
 * groups. Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_create_groups(ztier_engine_t* engine,
                                                       const ztier_optimizer_options_t* groups,
                                                       size_t group_count,
                                                       const uint64_t* param_ids,
                                                       const uint32_t* param_groups,
                                                       size_t param_count);

/* One optimizer step over every parameter that has a gradient partition
 * (ztier_param_grad_reduce / ztier_grad_partition_write); the others are
 * left as they are. The updated partitions are written to their tier (a
 * full parameter still held is freed; the next fetch gathers the new
 * values). `options` may be NULL (keep the last ones) or replace them (a new
 * lr each step; the kind cannot change). Gradients are not cleared and the
 * training step is not ended (ztier_grad_clear, ztier_step_end).
 * On failure (a read or write error, a full drive) the optimizer state and
 * its step count are those before the call; the gradients are kept, so the
 * same call can be repeated once the cause is fixed, and gives the same
 * result. Parameters written before the failure already hold the new
 * values (the repeat writes the same ones). ZTIER_STATUS_CORRUPTION means
 * the stored state itself failed its checksum (a torn or altered slot): it
 * is never used, and only a checkpoint can restore it. Serialised per
 * engine. */
ZTIER_API ztier_status_t ztier_optimizer_step(ztier_engine_t* engine,
                                              const ztier_optimizer_options_t* options);

/* ztier_optimizer_step with one set of hyperparameters per parameter group
 * (`group_count` as created; a new lr per group each step, as an lr
 * scheduler sets them). ztier_optimizer_step's `options` replace group 0's
 * and fit an optimizer of one group only. Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_step_groups(ztier_engine_t* engine,
                                                     const ztier_optimizer_options_t* groups,
                                                     size_t group_count);

/* The same step begun before backward ends, so that the optimizer state's
 * reads, updates and writes overlap the rest of backward. Call it when the
 * backward pass that completes this step's gradients starts; each sub-group
 * is then updated as soon as every parameter in it has its gradient handed
 * in (ztier_param_grad_reduce), last sub-group first (backward finishes the
 * last layers' gradients first). Updated parameters are kept in host memory
 * until ztier_optimizer_step_finish writes them, so a forward before the
 * finish still sees the old values. A second gradient for a parameter the
 * begun step already took (accumulation over another backward),
 * ztier_grad_partition_write of one, ztier_grad_clear, ztier_optimizer_step
 * or _step_groups cancel the begun step (nothing is committed).
 * Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_step_begin(ztier_engine_t* engine,
                                                    const ztier_optimizer_options_t* groups,
                                                    size_t group_count);
/* Ends the step: parameters without a gradient by now are not updated;
 * waits for the begun step, writes the updated parameters to their tier and
 * commits. With hyperparameters that differ from the begin's (or without a
 * begun step) it runs the whole step now, as ztier_optimizer_step_groups.
 * Failure as ztier_optimizer_step. Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_step_finish(ztier_engine_t* engine,
                                                     const ztier_optimizer_options_t* groups,
                                                     size_t group_count);
/* Abandons a begun step (nothing is committed); OK without one. */
ZTIER_API ztier_status_t ztier_optimizer_step_cancel(ztier_engine_t* engine);

typedef enum ztier_state_array {
  ZTIER_STATE_MASTER = 0,    /* fp32 master weights */
  ZTIER_STATE_EXP_AVG = 1,   /* first moment */
  ZTIER_STATE_EXP_AVG_SQ = 2 /* second moment */
} ztier_state_array_t;

/* Copies parameter `id`'s optimizer state `array` (partition_numel float32,
 * `bytes` = 4 x partition_numel) as of the last completed step, checked
 * against its checksum (for checkpoints and checks). Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_state_read(ztier_engine_t* engine, uint64_t id,
                                                    ztier_state_array_t array, float* out,
                                                    size_t bytes);

typedef struct ztier_optimizer_stats {
  size_t size;               /* sizeof(ztier_optimizer_stats_t) */
  uint64_t step;             /* completed optimizer steps */
  uint64_t elements;         /* state elements (sum of the partitions) */
  uint32_t sub_groups;
  uint32_t threads;          /* update threads */
  uint32_t isa;              /* 0 scalar, 1 AVX2, 2 AVX-512 */
  uint32_t peak_buffers;     /* last step: most state buffers in use at once */
  uint64_t slot_bytes;       /* bytes of one state buffer */
  /* The last step: */
  uint64_t bytes_read;       /* state bytes read */
  uint64_t bytes_written;    /* state bytes written */
  uint64_t param_bytes;      /* parameter bytes written */
  double step_s;             /* the whole call */
  double read_wait_s;        /* waiting for state reads */
  double update_s;           /* the update itself */
  double drain_s;            /* waiting for the last writes */
} ztier_optimizer_stats_t;

/* Fills `stats` (set stats->size first). Serialised per engine. */
ZTIER_API ztier_status_t ztier_optimizer_stats(ztier_engine_t* engine,
                                               ztier_optimizer_stats_t* stats);

/* ------------------------------------------------------------- checkpoints */

/* Checkpoints (docs/checkpoint.md): a directory that holds every rank's
 * parameter partitions, pending gradient partitions and optimizer state
 * (master, moments, step counts, hyperparameters), the config, a manifest
 * and the caller's own bytes. It appears whole or not at all: a crash or an
 * error during a save leaves the directory as it was (the previous
 * checkpoint there, or none). Saved at one world size, it loads at any. */

/* Names parameter `id` (e.g. torch's "layer.0.weight") and gives its shape
 * (`ndim` sizes whose product is its numel; ndim 0: a 0-d tensor of one
 * element), for exports; a parameter never named exports flat.
 * Optional. Serialised per engine. */
ZTIER_API ztier_status_t ztier_param_set_name(ztier_engine_t* engine, uint64_t id,
                                              const char* name, const uint64_t* shape,
                                              size_t ndim);

/* Saves a checkpoint of every rank to `dir` (its parent must exist; an
 * existing checkpoint there is replaced atomically, anything else there is
 * refused). Collective: every rank calls it, with the same `dir` (a
 * filesystem every rank sees). `user_data` (`user_bytes`, up to 1 GiB) is
 * stored as is: the trainer's step, RNG states, data position; each
 * rank's own is kept. Streamed through a few 16 MiB buffers and the
 * optimizer's own. Not while an optimizer step is begun or a module is
 * fetched; a refusal on one rank fails the call on every rank (none waits
 * for it). On failure nothing is published and the training state is
 * untouched. Serialised per engine. */
ZTIER_API ztier_status_t ztier_checkpoint_save(ztier_engine_t* engine, const char* dir,
                                               const void* user_data, size_t user_bytes);

/* The same save, most of it while training goes on: returns once this
 * rank's parameter and gradient partitions are written (training may then
 * change them: run the next forward and backward); the optimizer state is
 * written on a thread of the engine's. The next call that uses or changes
 * the optimizer state (ztier_optimizer_step*, _step_begin/_finish, another
 * save; collectives, which every rank makes at the same point) first
 * finishes the save and publishes it; ztier_optimizer_state_read waits for
 * the state part only. ztier_checkpoint_wait finishes it now and returns its
 * outcome; a failure finished by another call is also reported by
 * ztier_engine_async_error. Destroying the engine abandons an unfinished save
 * (nothing is published). Serialised per engine. */
ZTIER_API ztier_status_t ztier_checkpoint_save_async(ztier_engine_t* engine, const char* dir,
                                                     const void* user_data, size_t user_bytes);
/* Finishes a background save (collective) and returns the outcome of the
 * last one, then forgets it; OK when there was none. Serialised per
 * engine. */
ZTIER_API ztier_status_t ztier_checkpoint_wait(ztier_engine_t* engine);

/* Loads `dir` into this engine (each rank independently): the same
 * parameters (id, numel, dtype) must be registered and, if the checkpoint
 * holds optimizer state, the optimizer created with the same groups. The
 * engine's pending gradients are replaced by the checkpoint's, the
 * optimizer's step, moments and hyperparameters by the saved ones. Not while
 * a module is fetched. A missing, damaged or mismatched checkpoint is
 * refused before anything is
 * changed, naming the file (and offset) and what is wrong; damage found
 * part-way (a data chunk failing its CRC32C) leaves the engine failed
 * (ZTIER_STATUS_ENGINE_FAILED afterwards: destroy it). Serialised per
 * engine. */
ZTIER_API ztier_status_t ztier_checkpoint_load(ztier_engine_t* engine, const char* dir);

/* The user data rank 0 saved in checkpoint `dir`: `*bytes` receives its
 * size; with `out` NULL and `capacity` 0 that is all (a size query), else
 * `capacity` must hold it. Thread-safe. */
ZTIER_API ztier_status_t ztier_checkpoint_user_data(const char* dir, void* out, size_t capacity,
                                                    size_t* bytes);
/* The same for the user data rank `rank` of the saving run gave (each rank's
 * own is kept: its RNG state, its data position). Thread-safe. */
ZTIER_API ztier_status_t ztier_checkpoint_rank_user_data(const char* dir, uint32_t rank,
                                                         void* out, size_t capacity,
                                                         size_t* bytes);

/* Checks every file and every chunk of checkpoint `dir`. OK: `summary`
 * receives one line (step, world size, sizes); otherwise the error code, and
 * `summary` receives what is wrong and where. Either may be NULL/0.
 * Thread-safe. */
ZTIER_API ztier_status_t ztier_checkpoint_verify(const char* dir, char* summary,
                                                 size_t summary_bytes);

/* Writes the consolidated full-precision weights of checkpoint `dir` (the
 * fp32 master weights where the optimizer kept them, else the parameters as
 * float32) as a file torch.load reads: a dict of name -> tensor with the
 * shapes given to ztier_param_set_name (names "param.<id>" and flat tensors
 * otherwise). Streamed: memory stays a few MiB. Thread-safe. */
ZTIER_API ztier_status_t ztier_checkpoint_export(const char* dir, const char* out_path);

/* ------------------------------------------------------------- observing */

typedef struct ztier_stats {
  size_t size; /* sizeof(ztier_stats_t) */
  uint64_t steps;
  uint64_t fetch_calls;
  uint64_t demand_gathers;   /* params gathered on demand */
  uint64_t prefetch_gathers; /* params gathered ahead of use */
  uint64_t releases;
  uint64_t nvme_reads;       /* partitions swapped in */
  uint64_t nvme_bytes_read;
  uint64_t nvme_bytes_written;
  uint64_t grad_reduces;     /* ztier_param_grad_reduce calls that succeeded */
  uint64_t live_numel;       /* elements of full parameters on the device now */
  uint64_t peak_live_numel;
  uint32_t peak_swap_buffers;
  uint32_t trace_mode;       /* 0 record, 1 complete, 2 invalid */
  double stall_nvme_s;       /* seconds fetches waited for reads */
  double stall_device_s;     /* seconds fetches waited for copies + gathers */
  /* Since 0.2 (docs/design.md "Dynamic traces"); a struct that ends above
   * is still filled up to its size. */
  uint64_t fetch_calls_with_demand; /* module fetches that gathered on demand */
  uint64_t trace_orders;       /* module orders learned and kept */
  uint64_t trace_switches;     /* steps moved to another known order */
  uint64_t trace_resyncs;      /* skips ahead to the next matching module */
  uint64_t trace_off;          /* fetches no known order had a place for */
  uint64_t hints;              /* modules named by ztier_module_hint */
  uint64_t hint_gathers;       /* params gathered ahead because of a hint */
  uint64_t speculative_gathers; /* params gathered for a guessed choice */
  uint64_t speculation_hits;   /* choices guessed right */
  uint64_t speculation_misses; /* choices guessed wrong */
  uint64_t speculation_wasted; /* params a wrong guess gathered, freed unused */
  uint64_t repacks;            /* NVMe packs laid out again in trace order */
} ztier_stats_t;

/* Fills `stats` (set stats->size first: sizeof(ztier_stats_t), or the size
 * of the struct before 0.2, which ends at stall_device_s). Any thread, any
 * time. */
ZTIER_API ztier_status_t ztier_engine_stats(ztier_engine_t* engine, ztier_stats_t* stats);

/* The first error that happened on a background thread (a failed prefetch
 * read, a failed gather), kept until ztier_engine_clear_async_error: `*status`
 * is ZTIER_STATUS_OK when there was none; its text is copied into
 * `message` (NUL-terminated, truncated to `message_bytes`; may be NULL).
 * The failed parameter's next fetch also returns it. Any thread. */
ZTIER_API ztier_status_t ztier_engine_async_error(ztier_engine_t* engine,
                                                  ztier_status_t* status, char* message,
                                                  size_t message_bytes);
ZTIER_API ztier_status_t ztier_engine_clear_async_error(ztier_engine_t* engine);

/* The device the engine's pointers live on (host emulation or CUDA) and,
 * for CUDA, its ordinal (`ordinal` may be NULL). Thread-safe. */
ZTIER_API ztier_status_t ztier_engine_device(ztier_engine_t* engine,
                                             ztier_device_kind_t* kind, int32_t* ordinal);

/* One line: rank, device, comm, swap buffers, I/O backend, copied as
 * ztier_engine_async_error copies. Serialised per engine. */
ZTIER_API ztier_status_t ztier_engine_describe(ztier_engine_t* engine, char* out,
                                               size_t out_bytes);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ZTIER_ZTIER_H_ */
