// The ztier-trace-v1 file (docs/design.md "Formats"): a model's parameters and
// modules and the fetch/release hook calls of one or more training steps.
// It is the input of `ztier replay` and of the step benchmark, and what
// `ztier trace gen` writes from a model shape (configs/models/*.yaml).
//
// Plain values; no thread-safety concerns.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"

namespace ztier::coordinator {

// Where a parameter's partition lives between uses.
enum class ParamTier : uint8_t { kNvme = 0, kHost, kDevice };

struct TraceParam {
  uint64_t id = 0;
  uint64_t numel = 0;    // elements of the full parameter
  bool persist = false;  // forced persistent (else decided by thresholds)
  ParamTier tier = ParamTier::kNvme;
  std::string name;      // optional, for messages ("layers.0.attn.qkv.weight")

  friend bool operator==(const TraceParam&, const TraceParam&) = default;
};

struct TraceModule {
  uint64_t id = 0;
  std::string name;
  std::vector<uint64_t> params;  // parameter ids this module uses directly
  std::optional<uint64_t> parent;
  // Compute work of one call (forward; backward is taken as 2x), for the
  // step benchmark's --tflops emulation. 0 when unknown.
  uint64_t flops = 0;

  friend bool operator==(const TraceModule&, const TraceModule&) = default;
};

// kHint: the trainer named `module` as one that runs soon (an MoE router's
// chosen expert); consecutive hint events are one Coordinator::Hint call.
enum class TraceOp : uint8_t { kFetch = 0, kRelease, kHint };

// The file stores `forward` on a fetch and `backward` on a release;
// ParseTrace and GenerateTrace set the other field to its complement
// (backward == !forward), so either may be read for either op. A hint
// carries neither (forward = true, backward = false).
struct TraceEvent {
  TraceOp op = TraceOp::kFetch;
  uint64_t module = 0;
  bool forward = true;  // fetch: forward or backward pass
  bool backward = false;  // release: after backward

  friend bool operator==(const TraceEvent&, const TraceEvent&) = default;
};

struct TraceFile {
  uint32_t world_size = 1;
  std::vector<TraceParam> params;
  std::vector<TraceModule> modules;
  std::vector<std::vector<TraceEvent>> steps;
  // Optional config overrides: flat "section.key" -> YAML/JSON scalar text,
  // e.g. {"coordinator.prefetch_bucket_size": "50000000"}.
  std::map<std::string, std::string> config;
  std::string model;  // model name, if generated from a shape

  friend bool operator==(const TraceFile&, const TraceFile&) = default;
};

// Parses and validates (ids unique, module params exist, events name known
// modules, a release follows a fetch of the same module). Errors name the
// JSON path (e.g. "steps[1][7].module: unknown module 42").
Result<TraceFile> ParseTrace(std::string_view json_text, std::string_view source_name);
Result<TraceFile> LoadTrace(const std::string& path);
std::string TraceToJson(const TraceFile& trace);
Status SaveTrace(const TraceFile& trace, const std::string& path);

// A model shape (configs/models/*.yaml).
struct ModelShape {
  std::string name;
  std::string family;   // "gpt2" | "llama" | "moe"
  uint64_t layers = 0;
  uint64_t hidden = 0;
  uint64_t heads = 0;
  uint64_t kv_heads = 0;     // llama: key/value heads (grouped-query); 0: heads
  uint64_t vocab = 0;
  uint64_t ffn_hidden = 0;   // 0: family default (4h gpt2, 8h/3 rounded llama)
  uint64_t seq_len = 1024;   // tokens per sequence, for FLOPs
  uint64_t batch = 1;        // sequences per step per rank, for FLOPs
  bool tied_embeddings = false;
  uint64_t experts = 0;      // moe: experts per MoE layer
  uint64_t moe_every = 2;    // moe: every Nth layer is MoE
};

Result<ModelShape> LoadModelShape(const std::string& path);

struct TraceGenOptions {
  uint32_t steps = 3;  // training steps (forward then backward)
  // RL-style generation: before each training step, this many forward-only
  // steps (a decode pass: every module fetched and released with
  // forward=true, no backward). The file holds steps x (decode_steps + 1)
  // steps. At most kMaxDecodeSteps; the total at most kMaxGeneratedSteps.
  uint32_t decode_steps = 0;
  uint32_t world_size = 1;
  // Divides every tensor's element count (rounded up, at least 1), keeping
  // the structure (layers, modules, order): a 70B shape on a small disk.
  // Module FLOPs are divided too, so compute per byte moved stays the same.
  double scale = 1.0;
  // Activation checkpointing: each layer's forward modules run again at the
  // start of its backward.
  bool checkpointing = false;
  uint64_t seed = 1;  // moe: which experts each step routes to
  // moe: right after each router's forward call, hint events naming the
  // experts it chose, as a trainer calling ztier_module_hint would.
  bool hints = false;
};

// Bounds of TraceGenOptions: a trace is held in memory and written as one
// JSON file, so a mistyped count fails with a message instead of filling
// memory or disk.
inline constexpr uint32_t kMaxDecodeSteps = 1000;
inline constexpr uint64_t kMaxGeneratedSteps = 1'000'000;

// Builds the module tree (embeddings, per layer attention and MLP modules,
// final norm, head; tied head uses the embedding's weight), and for each
// training step: options.decode_steps forward-only steps, then forward
// fetch/release in order, then backward in reverse order. An MoE model
// routes each step's tokens (decode steps' too) to different experts, so the
// module order changes between steps (exercises trace invalidation); a
// training step routes the same whatever decode_steps is.
Result<TraceFile> GenerateTrace(const ModelShape& shape, const TraceGenOptions& options);

}  // namespace ztier::coordinator
