// Checkpoints (checkpoint/) of a small model held by in-memory "engines" (one
// per rank: parameter and pending-gradient partitions in vectors) and real
// OptimizerSwappers on files:
//   - a save and load give back every byte: parameters, pending gradients,
//     the optimizer's three arrays, its step and per-parameter update counts,
//     the user blob;
//   - a checkpoint of N ranks loads at M (partitions re-cut, padding zero);
//   - a save that fails at any one of its file operations leaves the previous
//     checkpoint, loadable, and no temporary directory;
//   - a process killed (SIGKILL) at a random point of a save loop leaves a
//     checkpoint equal to an independent replay of the step it names;
//   - damage to any file is refused, naming the file (and the chunk);
//     a checkpoint of another model is refused before anything is written;
//   - ExportTorch writes what torch.load reads (when torch is installed);
//   - a save never replaces what is not a checkpoint.
#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "base/float16.h"
#include "coordinator/collective.h"
#include "io/async_engine.h"
#include "io/backend.h"
#include "io/engine.h"
#include "tests/testutil/testutil.h"

namespace ztier::checkpoint {
namespace {

namespace fs = std::filesystem;
using coordinator::DType;
using swapper::OptimizerSegment;
using swapper::OptimizerSwapper;
using swapper::StateArray;
using ztier::testing::ScratchDir;

#define ASSERT_OK(expr)                                                  \
  do {                                                                   \
    const ::ztier::Status _st = (expr);                                  \
    ASSERT_TRUE(_st.ok()) << #expr << ": " << _st.ToString();            \
  } while (0)
#define EXPECT_OK(expr)                                                  \
  do {                                                                   \
    const ::ztier::Status _st = (expr);                                  \
    EXPECT_TRUE(_st.ok()) << #expr << ": " << _st.ToString();            \
  } while (0)

// ---------------------------------------------------------------- the model

struct ParamSpec {
  uint64_t id;
  std::string name;
  std::vector<uint64_t> shape;  // empty: flat
  uint64_t numel;
  DType dtype;
  bool has_state;  // the optimizer updates it
  uint32_t group;  // its parameter group (if has_state)
};

// Six parameters covering the cases a re-partition gets wrong: an element
// count no world size divides, fewer elements than ranks (some ranks hold
// only padding), every dtype, parameters without optimizer state.
const std::vector<ParamSpec>& Specs() {
  static const std::vector<ParamSpec> specs = {
      {10, "embed.weight", {37, 29}, 1073, DType::kFloat32, true, 0},
      {11, "head.bias", {3}, 3, DType::kFloat32, true, 1},
      {12, "block.weight", {64, 40}, 2560, DType::kBFloat16, true, 0},
      {13, "block.norm", {}, 1, DType::kFloat16, true, 1},  // 0-d
      {14, "running_mean", {5, 7}, 35, DType::kFloat32, false, 0},
      {15, "mask", {50}, 50, DType::kUInt8, false, 0},
  };
  return specs;
}

std::vector<optim::AdamHyper> Hypers() {
  optim::AdamHyper decay;
  decay.lr = 1e-2;
  decay.weight_decay = 0.01;
  optim::AdamHyper plain;
  plain.lr = 3e-3;
  plain.adamw = false;
  return {decay, plain};
}

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A value in [-1, 1) that depends on (a, b, c) only: the initial weights and
// the gradients are functions of the element's index in the full parameter,
// so every world size (and a replaying process) sees the same model.
float Value(uint64_t a, uint64_t b, uint64_t c) {
  const uint64_t h = Mix(Mix(Mix(a) ^ b) ^ c);
  return static_cast<float>(h >> 40) / static_cast<float>(1 << 23) - 1.0f;
}
float InitValue(uint64_t seed, uint64_t id, uint64_t i) { return 0.5f * Value(seed, id, i); }
// Step s's gradient; every 7th element large, so moments differ in scale.
float GradValue(uint64_t s, uint64_t id, uint64_t i) {
  return Value(1000 + s, id, i) * (i % 7 == 0 ? 30.f : 1.f);
}

void Put(DType t, float f, uint8_t* out) {
  uint16_t h;
  switch (t) {
    case DType::kFloat32: memcpy(out, &f, 4); return;
    case DType::kFloat16: h = FloatToHalf(f); memcpy(out, &h, 2); return;
    case DType::kBFloat16: h = FloatToBf16(f); memcpy(out, &h, 2); return;
    case DType::kUInt8: *out = static_cast<uint8_t>((f + 1.f) * 127.5f); return;
  }
}

float AsFloat(DType t, const uint8_t* p) {
  uint16_t h;
  float f;
  switch (t) {
    case DType::kFloat16: memcpy(&h, p, 2); return HalfToFloat(h);
    case DType::kBFloat16: memcpy(&h, p, 2); return Bf16ToFloat(h);
    case DType::kUInt8: return *p;
    default: memcpy(&f, p, 4); return f;
  }
}

uint64_t PartOf(uint64_t numel, uint32_t world) { return (numel + world - 1) / world; }

// Rank `rank`'s partition of a parameter whose element i is value(i): part
// elements from rank * part, zero past numel.
std::vector<uint8_t> PartitionOf(const ParamSpec& p, uint32_t rank, uint32_t world,
                                 const std::function<float(uint64_t)>& value) {
  const uint64_t part = PartOf(p.numel, world);
  const uint32_t eb = coordinator::DTypeBytes(p.dtype);
  std::vector<uint8_t> out(part * eb, 0);
  for (uint64_t k = 0; k < part; ++k) {
    const uint64_t i = rank * part + k;
    if (i < p.numel) Put(p.dtype, value(i), out.data() + k * eb);
  }
  return out;
}

Result<std::unique_ptr<io::AsyncEngine>> MakeEngine() {
  // io_uring where the kernel allows it, else psync (every machine).
  auto backend = io::CreateBackend(io::BackendKind::kIoUring, io::BackendOptions{.queue_depth = 8});
  if (!backend.ok()) {
    backend = io::CreateBackend(io::BackendKind::kPsync,
                                io::BackendOptions{.queue_depth = 4, .psync_threads = 2});
  }
  if (!backend.ok()) return backend.status();
  ZTIER_ASSIGN_OR_RETURN(
      auto engine, io::Engine::Create(std::move(backend).value(),
                                      io::EngineOptions{.block_size = 64 << 10, .queue_depth = 8}));
  return io::AsyncEngine::Create(std::move(engine));
}

using Exchange = std::function<Result<std::vector<uint64_t>>(uint64_t)>;

// One rank of a run, as an engine would hold it: its partition of every
// parameter and of each pending gradient, and a real optimizer swapper
// (state on files under `nvme_dir`) for the parameters with state.
class RankModel {
 public:
  RankModel(uint32_t rank, uint32_t world, std::string nvme_dir, uint64_t seed,
            std::vector<ParamSpec> specs = Specs())
      : rank_(rank), world_(world), nvme_dir_(std::move(nvme_dir)), seed_(seed),
        specs_(std::move(specs)) {}

  // The initial partitions of `seed`; the swapper created and initialised
  // from them (step 0).
  Status Setup() {
    std::vector<OptimizerSegment> segs;
    for (const ParamSpec& p : specs_) {
      params[p.id] = PartitionOf(p, rank_, world_, [&](uint64_t i) { return InitValue(seed_, p.id, i); });
      segment_[p.id] = -1;
      if (p.has_state) {
        segment_[p.id] = static_cast<int64_t>(segs.size());
        segs.push_back({p.id, Part(p), coordinator::ElementType(p.dtype), p.group});
      }
    }
    ZTIER_ASSIGN_OR_RETURN(engine_, MakeEngine());
    swapper::OptimizerSwapperOptions o;
    o.store.paths = {nvme_dir_};
    o.store.tag = "optimizer";
    o.store.rank = rank_;
    o.store.world_size = world_;
    o.store.stripe_bytes = 64 << 10;
    o.buffer_count = 2;
    o.sub_group_size = 700;  // segments straddle sub-groups and share them
    o.threads = 1;
    o.isa = optim::BestIsa();
    ZTIER_ASSIGN_OR_RETURN(opt, OptimizerSwapper::Create(o, segs, engine_.get()));
    return opt->Initialize([this](uint64_t id, void* out) {
      memcpy(out, params.at(id).data(), params.at(id).size());
      return Status::Ok();
    });
  }

  // Optimizer step number `s` with the gradients of step s (the partition of
  // GradValue(s, ...)); "block.norm" gets none on even steps, so update
  // counts differ between parameters. The updated partitions land in params.
  Status Step(uint64_t s) {
    std::map<uint64_t, std::vector<uint8_t>> g;
    for (const ParamSpec& p : specs_) {
      if (!p.has_state || (p.id == 13 && s % 2 == 0)) continue;
      g[p.id] = PartitionOf(p, rank_, world_, [&](uint64_t i) { return GradValue(s, p.id, i); });
    }
    return opt->Step(
        Hypers(),
        [&](uint64_t id) -> Result<const void*> {
          auto it = g.find(id);
          return it == g.end() ? static_cast<const void*>(nullptr) : it->second.data();
        },
        [this](std::span<const uint64_t> ids, std::span<const void* const> data) {
          for (size_t k = 0; k < ids.size(); ++k) {
            auto& dst = params.at(ids[k]);
            memcpy(dst.data(), data[k], dst.size());
          }
          return Status::Ok();
        });
  }

  // A gradient partition left pending (accumulated for the next step).
  void SetPendingGrad(uint64_t id, uint64_t seed) {
    const ParamSpec& p = Spec(id);
    grads[id] = PartitionOf(p, rank_, world_, [&](uint64_t i) { return GradValue(seed, id, i) / 3; });
  }

  // What a training loop does between two checkpoints: step s, then a
  // backward that leaves gradients pending on two parameters.
  Status Advance(uint64_t s) {
    ZTIER_RETURN_IF_ERROR(Step(s));
    grads.clear();
    SetPendingGrad(10, 500 + s);
    SetPendingGrad(12, 500 + s);
    return Status::Ok();
  }

  RankAccess Access(Exchange exchange = nullptr) {
    RankAccess a;
    a.rank = rank_;
    a.world = world_;
    for (const ParamSpec& p : specs_) {
      RankParam rp;
      rp.id = p.id;
      rp.name = p.name;
      // "mask" is given no shape: it exports flat (as a parameter never named).
      if (p.name != "mask") rp.shape = p.shape;
      rp.numel = p.numel;
      rp.dtype = p.dtype;
      rp.part_numel = Part(p);
      rp.has_grad = grads.count(p.id) > 0;
      rp.segment = segment_.at(p.id);
      a.params.push_back(rp);
    }
    a.read_param = [this](uint64_t id, void* out) { return Copy(params, id, out); };
    a.read_grad = [this](uint64_t id, void* out) { return Copy(grads, id, out); };
    a.write_param = [this](uint64_t id, const void* in) { return Store(params, id, in); };
    a.write_grad = [this](uint64_t id, const void* in) { return Store(grads, id, in); };
    a.before_load = [this] {
      grads.clear();  // the engine's own pending gradients give way
      ++before_load_calls;
    };
    a.optimizer = opt.get();
    a.hypers = Hypers();
    a.exchange = exchange ? exchange : [](uint64_t v) -> Result<std::vector<uint64_t>> {
      return std::vector<uint64_t>{v};
    };
    a.config_yaml = "optimizer:\n  sub_group_size: 700\n";
    a.library_version = "checkpoint_test";
    return a;
  }

  uint64_t Part(const ParamSpec& p) const { return PartOf(p.numel, world_); }
  const ParamSpec& Spec(uint64_t id) const {
    for (const ParamSpec& p : specs_) {
      if (p.id == id) return p;
    }
    ADD_FAILURE() << "no parameter " << id;
    return specs_.front();
  }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  uint32_t rank() const { return rank_; }
  uint32_t world() const { return world_; }
  int64_t segment(uint64_t id) const { return segment_.at(id); }

  std::map<uint64_t, std::vector<uint8_t>> params, grads;  // partitions
  int before_load_calls = 0;

 private:
  Status Copy(const std::map<uint64_t, std::vector<uint8_t>>& from, uint64_t id, void* out) {
    auto it = from.find(id);
    if (it == from.end()) return Status::NotFound("no partition of parameter " + std::to_string(id));
    memcpy(out, it->second.data(), it->second.size());
    return Status::Ok();
  }
  Status Store(std::map<uint64_t, std::vector<uint8_t>>& to, uint64_t id, const void* in) {
    const ParamSpec& p = Spec(id);
    const auto* b = static_cast<const uint8_t*>(in);
    to[id].assign(b, b + Part(p) * coordinator::DTypeBytes(p.dtype));
    return Status::Ok();
  }

  uint32_t rank_, world_;
  std::string nvme_dir_;
  uint64_t seed_;
  std::vector<ParamSpec> specs_;
  std::map<uint64_t, int64_t> segment_;
  std::unique_ptr<io::AsyncEngine> engine_;  // declared first: outlives opt

 public:
  std::unique_ptr<OptimizerSwapper> opt;
};

using World = std::vector<std::unique_ptr<RankModel>>;

// `world` ranks set up from the initial weights of `seed`, each with its own
// swapper files under `root`.
Result<World> MakeWorld(uint32_t world, const std::string& root, uint64_t seed,
                        const std::vector<ParamSpec>& specs = Specs()) {
  static int counter = 0;
  std::error_code ec;
  fs::create_directories(root, ec);  // the store wants an existing parent
  World w;
  const std::string dir = root + "/nvme-" + std::to_string(counter++);
  for (uint32_t r = 0; r < world; ++r) {
    w.push_back(std::make_unique<RankModel>(r, world, dir, seed, specs));
    ZTIER_RETURN_IF_ERROR(w.back()->Setup());
  }
  return w;
}

// Steps first..last on every rank (the ranks' steps are independent: each
// updates its own partitions).
Status Train(World& w, uint64_t first, uint64_t last) {
  for (uint64_t s = first; s <= last; ++s) {
    for (auto& m : w) ZTIER_RETURN_IF_ERROR(m->Advance(s));
  }
  return Status::Ok();
}

// An all-gather of one uint64 among `world` threads (the exchange a real run
// does through its coordinator): each round every rank contributes a value
// and gets all of them in rank order.
class AllGather {
 public:
  explicit AllGather(uint32_t world) : values_(world) {}
  std::vector<uint64_t> Run(uint32_t rank, uint64_t v) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t round = round_;
    values_[rank] = v;
    if (++arrived_ == values_.size()) {
      result_ = values_;  // kept until every rank of the next round arrives
      arrived_ = 0;
      ++round_;
      cv_.notify_all();
      return result_;
    }
    cv_.wait(lock, [&] { return round_ != round; });
    return result_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint64_t> values_, result_;
  size_t arrived_ = 0;
  uint64_t round_ = 0;
};

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// `save(r, exchange)` on every rank at once, one thread per rank, the ranks
// exchanging through one AllGather; each rank's result.
std::vector<Status> OnEveryRank(uint32_t world,
                                const std::function<Status(uint32_t, const Exchange&)>& save) {
  AllGather gather(world);
  std::vector<Status> results(world);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      Exchange ex = [&gather, r](uint64_t v) -> Result<std::vector<uint64_t>> { return gather.Run(r, v); };
      results[r] = save(r, ex);
    });
  }
  for (auto& t : threads) t.join();
  return results;
}

// Save on every rank at once; the first error of any.
Status SaveWorld(World& w, const std::string& dir, const std::string& user, Fs& fsys = Fs::Posix()) {
  if (w.size() == 1) return Save(w[0]->Access(), dir, Bytes(user), fsys);
  const std::vector<Status> results =
      OnEveryRank(static_cast<uint32_t>(w.size()), [&](uint32_t r, const Exchange& ex) {
        // Each rank's own user data: the user text, then its rank after rank 0.
        const std::string mine = r == 0 ? user : user + "@" + std::to_string(r);
        return Save(w[r]->Access(ex), dir, Bytes(mine), fsys);
      });
  for (uint32_t r = 0; r < w.size(); ++r) {
    if (!results[r].ok()) return results[r].WithContext("rank " + std::to_string(r));
  }
  return Status::Ok();
}

// Load on every rank (a load is not collective).
Status LoadWorld(World& w, const std::string& dir) {
  for (auto& m : w) ZTIER_RETURN_IF_ERROR(Load(m->Access(), dir).status());
  return Status::Ok();
}

// ---------------------------------------------------------------- whole state

// A run's state reassembled from every rank's partitions, cut to each
// parameter's numel: what must survive a save and a load at any world size.
struct Full {
  std::map<uint64_t, std::vector<uint8_t>> params;  // numel x dtype bytes
  std::map<uint64_t, std::vector<uint8_t>> grads;   // pending ones only
  std::map<uint64_t, std::array<std::vector<float>, 3>> state;  // master, exp_avg, exp_avg_sq
  uint64_t step = 0;
  std::map<uint64_t, uint64_t> updates;  // per parameter with state
};

bool AllZero(const uint8_t* p, size_t n) {
  return std::all_of(p, p + n, [](uint8_t b) { return b == 0; });
}

// Also checks that every partition's padding (past numel) is zero.
Result<Full> Gather(const std::vector<RankModel*>& ranks) {
  const auto world = static_cast<uint32_t>(ranks.size());
  Full f;
  f.step = ranks[0]->opt->step();
  // Rank r's partition `v` of `p` (elements of `eb` bytes) into `full`.
  auto join = [world](const std::vector<uint8_t>& v, uint32_t r, const ParamSpec& p, uint32_t eb,
                      uint8_t* full) -> Status {
    const uint64_t n = PartOf(p.numel, world);
    const uint64_t start = r * n;
    const uint64_t own = start >= p.numel ? 0 : std::min(n, p.numel - start);
    const std::string where = "rank " + std::to_string(r) + ", parameter " + std::to_string(p.id);
    if (v.size() != n * eb) return Status::Internal(where + ": a partition of the wrong size");
    if (own > 0) memcpy(full + start * eb, v.data(), own * eb);
    if (!AllZero(v.data() + own * eb, (n - own) * eb)) {
      return Status::Internal(where + ": the padding is not zero");
    }
    return Status::Ok();
  };
  for (const ParamSpec& p : ranks[0]->specs()) {
    const uint32_t eb = coordinator::DTypeBytes(p.dtype);
    f.params[p.id].assign(p.numel * eb, 0);
    const bool has_grad = ranks[0]->grads.count(p.id) > 0;
    if (has_grad) f.grads[p.id].assign(p.numel * eb, 0);
    if (p.has_state) {
      for (auto& a : f.state[p.id]) a.assign(p.numel, 0.f);
      f.updates[p.id] = ranks[0]->opt->updates(static_cast<uint32_t>(ranks[0]->segment(p.id)));
    }
    for (uint32_t r = 0; r < world; ++r) {
      RankModel& m = *ranks[r];
      if (m.opt->step() != f.step) return Status::Internal("the ranks are at different steps");
      ZTIER_RETURN_IF_ERROR(join(m.params.at(p.id), r, p, eb, f.params[p.id].data()));
      if ((m.grads.count(p.id) > 0) != has_grad) return Status::Internal("the ranks disagree on a gradient");
      if (has_grad) ZTIER_RETURN_IF_ERROR(join(m.grads.at(p.id), r, p, eb, f.grads[p.id].data()));
      if (!p.has_state) continue;
      const auto seg = static_cast<uint32_t>(m.segment(p.id));
      if (m.opt->updates(seg) != f.updates[p.id]) return Status::Internal("the ranks disagree on updates");
      std::vector<uint8_t> part(m.Part(p) * 4);
      for (int a = 0; a < 3; ++a) {
        ZTIER_RETURN_IF_ERROR(m.opt->ReadState(p.id, static_cast<StateArray>(a),
                                               reinterpret_cast<float*>(part.data())));
        ZTIER_RETURN_IF_ERROR(
            join(part, r, p, 4, reinterpret_cast<uint8_t*>(f.state[p.id][a].data())));
      }
    }
  }
  return f;
}

Result<Full> Gather(World& w) {
  std::vector<RankModel*> ranks;
  for (auto& m : w) ranks.push_back(m.get());
  return Gather(ranks);
}

// "" when equal bit for bit, else where they first differ.
std::string Diff(const Full& a, const Full& b) {
  if (a.step != b.step) return "step " + std::to_string(a.step) + " vs " + std::to_string(b.step);
  if (a.updates != b.updates) return "the per-parameter update counts differ";
  auto bytes = [](const std::string& what, const std::map<uint64_t, std::vector<uint8_t>>& x,
                  const std::map<uint64_t, std::vector<uint8_t>>& y) -> std::string {
    std::set<uint64_t> kx, ky;
    for (auto& [k, v] : x) kx.insert(k);
    for (auto& [k, v] : y) ky.insert(k);
    if (kx != ky) return what + ": different parameters hold one";
    for (auto& [k, v] : x) {
      const auto& u = y.at(k);
      if (v.size() != u.size()) return what + " of " + std::to_string(k) + ": sizes differ";
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] != u[i]) return what + " of " + std::to_string(k) + " differs at byte " + std::to_string(i);
      }
    }
    return "";
  };
  std::string d = bytes("parameter", a.params, b.params);
  if (d.empty()) d = bytes("gradient", a.grads, b.grads);
  if (!d.empty()) return d;
  for (auto& [id, arrays] : a.state) {
    for (int k = 0; k < 3; ++k) {
      const auto& x = arrays[k];
      const auto& y = b.state.at(id)[k];
      if (x.size() != y.size() || memcmp(x.data(), y.data(), 4 * x.size()) != 0) {
        return "optimizer array " + std::to_string(k) + " of parameter " + std::to_string(id) + " differs";
      }
    }
  }
  return "";
}

// ---------------------------------------------------------------- files

// Temporary directories of saves of `name` left in `parent`.
std::vector<std::string> TempDirs(const std::string& parent, const std::string& name) {
  std::vector<std::string> out;
  const std::string prefix = "." + name + ".tmp-";
  for (const auto& e : fs::directory_iterator(parent)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0) out.push_back(n);
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

bool Contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// Counts every file operation a save makes through the seam and fails the
// one numbered `fail_at` (0-based; -1: none) with IoError, as a full drive
// or a failing disk would. RemoveAll (the clean-up) is not counted.
class CountingFs : public Fs {
 public:
  explicit CountingFs(int64_t fail_at = -1) : fail_at_(fail_at) {}

  Result<int> Create(const std::string& path, bool direct, bool* is_direct) override {
    ZTIER_RETURN_IF_ERROR(Count("create", path));
    return Fs::Create(path, direct, is_direct);
  }
  Status Write(int fd, const void* data, uint64_t bytes, uint64_t offset,
               const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("write", path));
    return Fs::Write(fd, data, bytes, offset, path);
  }
  Status Truncate(int fd, uint64_t bytes, const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("truncate", path));
    return Fs::Truncate(fd, bytes, path);
  }
  Status Allocate(int fd, uint64_t bytes, const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("allocate", path));  // e.g. ENOSPC up front
    return Fs::Allocate(fd, bytes, path);
  }
  Status Fsync(int fd, const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("fsync", path));
    return Fs::Fsync(fd, path);
  }
  Status Close(int fd, const std::string& path) override {
    const Status s = Count("close", path);
    const Status closed = Fs::Close(fd, path);  // released either way, as close(2) does
    return s.ok() ? closed : s;
  }
  Status Mkdir(const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("mkdir", path));
    return Fs::Mkdir(path);
  }
  Status FsyncDir(const std::string& path) override {
    ZTIER_RETURN_IF_ERROR(Count("fsync-dir", path));
    return Fs::FsyncDir(path);
  }
  Status Rename(const std::string& from, const std::string& to, bool exchange) override {
    ZTIER_RETURN_IF_ERROR(Count(exchange ? "rename-exchange" : "rename", from + " -> " + to));
    return Fs::Rename(from, to, exchange);
  }

  uint64_t ops() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_.size();
  }
  std::vector<std::string> log() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

 private:
  // Writes of the data file come from the shard writer's thread.
  Status Count(const std::string& op, const std::string& path) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto n = static_cast<int64_t>(log_.size());
    log_.push_back(op + " " + path);
    if (n == fail_at_) return Status::IoError("injected failure of op " + std::to_string(n) + " (" + op + " " + path + ")");
    return Status::Ok();
  }

  const int64_t fail_at_;
  mutable std::mutex mu_;
  std::vector<std::string> log_;
};

class CheckpointTest : public ::testing::Test {
 protected:
  std::string Path(const std::string& name) const { return dir_.File(name); }
  ScratchDir dir_;
};

// ---------------------------------------------------------------- 1. round trip

TEST_F(CheckpointTest, RoundTripGivesBackEveryByte) {
  auto src = MakeWorld(1, Path("src"), /*seed=*/1);
  ASSERT_OK(src.status());
  ASSERT_OK(Train(*src, 1, 3));
  Result<Full> before = Gather(*src);
  ASSERT_OK(before.status());
  // A state worth saving: three steps, "block.norm" skipped on step 2,
  // gradients pending on two parameters only.
  ASSERT_EQ(before->step, 3u);
  ASSERT_EQ(before->updates.at(10), 3u);
  ASSERT_EQ(before->updates.at(13), 2u);
  ASSERT_EQ(before->grads.size(), 2u);

  const std::string dir = Path("ckpt");
  const std::string user("epoch 7\0rng state", 17);  // binary, with a NUL
  ASSERT_OK(SaveWorld(*src, dir, user));
  std::string summary;
  ASSERT_OK(Verify(dir, &summary));
  EXPECT_TRUE(Contains(summary, "valid")) << summary;
  EXPECT_TRUE(Contains(summary, "step 3")) << summary;
  EXPECT_TRUE(Contains(summary, "world size 1")) << summary;
  EXPECT_TRUE(Contains(summary, "6 parameters")) << summary;
  EXPECT_TRUE(TempDirs(dir_.path(), "ckpt").empty());

  // A fresh engine: other initial weights, and a stale pending gradient the
  // load must drop (before_load) since the checkpoint has none for it.
  auto dst = MakeWorld(1, Path("dst"), /*seed=*/2);
  ASSERT_OK(dst.status());
  (*dst)[0]->SetPendingGrad(11, 99);
  ASSERT_NE(Diff(*before, *Gather(*dst)), "");
  bool wrote = false;
  Result<Manifest> loaded = Load((*dst)[0]->Access(), dir, &wrote);
  ASSERT_OK(loaded.status());
  EXPECT_TRUE(wrote);
  EXPECT_EQ((*dst)[0]->before_load_calls, 1);
  Result<Full> after = Gather(*dst);
  ASSERT_OK(after.status());
  EXPECT_EQ(Diff(*before, *after), "");

  // The manifest: names, shapes, flags, hyperparameters.
  const Manifest& m = *loaded;
  EXPECT_EQ(m.step, 3u);
  EXPECT_EQ(m.world_size, 1u);
  EXPECT_EQ(m.library_version, "checkpoint_test");
  ASSERT_EQ(m.params.size(), Specs().size());
  for (size_t k = 0; k < m.params.size(); ++k) {
    const ParamSpec& s = Specs()[k];
    EXPECT_EQ(m.params[k].id, s.id);
    EXPECT_EQ(m.params[k].name, s.name);
    if (s.name == "mask") {
      EXPECT_FALSE(m.params[k].shape.has_value());
    } else {
      EXPECT_EQ(m.params[k].shape, s.shape);
    }
    EXPECT_EQ(m.params[k].has_state, s.has_state);
    EXPECT_EQ(m.params[k].has_grad, s.id == 10 || s.id == 12) << s.id;
    if (s.has_state) {
      EXPECT_EQ(m.params[k].updates, before->updates.at(s.id));
    }
  }
  ASSERT_EQ(loaded->groups.size(), 2u);
  EXPECT_EQ(loaded->groups[0].lr, Hypers()[0].lr);
  EXPECT_EQ(loaded->groups[0].weight_decay, Hypers()[0].weight_decay);
  EXPECT_EQ(loaded->groups[1].adamw, false);
  Result<std::string> blob = ReadUserData(dir);
  ASSERT_OK(blob.status());
  EXPECT_EQ(*blob, user);

  // The loaded run steps on exactly as the original (the bias-correction
  // counts came back, not just the arrays).
  ASSERT_OK(Train(*src, 4, 5));
  ASSERT_OK(Train(*dst, 4, 5));
  EXPECT_EQ(Diff(*Gather(*src), *Gather(*dst)), "");
}

// ---------------------------------------------------------------- 2. reshard

TEST_F(CheckpointTest, ACheckpointOfNRanksLoadsAtM) {
  // 1073 elements divide by none of 2, 3, 4; 3 and 1 element(s) leave ranks
  // with padding only.
  const std::vector<std::pair<uint32_t, uint32_t>> cases = {{2, 1}, {2, 4}, {1, 2}, {4, 3}};
  for (const auto& [from, to] : cases) {
    SCOPED_TRACE("saved at world " + std::to_string(from) + ", loaded at " + std::to_string(to));
    const std::string tag = std::to_string(from) + "to" + std::to_string(to);
    auto src = MakeWorld(from, Path("src" + tag), 1);
    ASSERT_OK(src.status());
    ASSERT_OK(Train(*src, 1, 3));
    const std::string dir = Path("ckpt" + tag);
    ASSERT_OK(SaveWorld(*src, dir, "u"));
    std::string summary;
    ASSERT_OK(Verify(dir, &summary));
    EXPECT_TRUE(Contains(summary, "world size " + std::to_string(from))) << summary;
    // Every rank's user data is kept; rank 0's is the default.
    EXPECT_EQ(*ReadUserData(dir), "u");
    for (uint32_t r = 0; r < from; ++r) {
      EXPECT_EQ(*ReadUserData(dir, r), r == 0 ? "u" : "u@" + std::to_string(r));
    }
    EXPECT_EQ(ReadUserData(dir, from).status().code(), StatusCode::kInvalidArgument);
    Result<Full> original = Gather(*src);
    ASSERT_OK(original.status());

    auto dst = MakeWorld(to, Path("dst" + tag), 2);
    ASSERT_OK(dst.status());
    ASSERT_OK(LoadWorld(*dst, dir));
    Result<Full> loaded = Gather(*dst);  // also: every padding is zero
    ASSERT_OK(loaded.status());
    EXPECT_EQ(Diff(*original, *loaded), "");

    // Another step on both worlds: the same full state.
    ASSERT_OK(Train(*src, 4, 4));
    ASSERT_OK(Train(*dst, 4, 4));
    EXPECT_EQ(Diff(*Gather(*src), *Gather(*dst)), "");
  }
}

// ---------------------------------------------------------------- 3. faults

TEST_F(CheckpointTest, ASaveFailingAtAnyFileOperationLeavesThePreviousCheckpoint) {
  auto run = MakeWorld(1, Path("run"), 1);
  ASSERT_OK(run.status());
  ASSERT_OK(Train(*run, 1, 2));
  const std::string dir = Path("ckpt");
  ASSERT_OK(SaveWorld(*run, dir, "state 1"));
  Result<Full> state1 = Gather(*run);
  ASSERT_OK(state1.status());

  // State 2: another step (new parameters, moments, counts), new gradients.
  ASSERT_OK(Train(*run, 3, 3));
  Result<Full> state2 = Gather(*run);
  ASSERT_OK(state2.status());
  ASSERT_NE(Diff(*state1, *state2), "");

  // N: the operations of a clean save of state 2 over a checkpoint (the
  // same path through the code as the saves below).
  fs::create_directories(Path("count"));
  ASSERT_OK(SaveWorld(*run, Path("count/ckpt"), "x"));
  CountingFs counter;
  ASSERT_OK(SaveWorld(*run, Path("count/ckpt"), "state 2", counter));
  const uint64_t n = counter.ops();
  std::printf("[ fault    ] a save makes %llu file operations:\n", static_cast<unsigned long long>(n));
  for (uint64_t k = 0; k < n; ++k) {
    std::printf("[ fault    ]   %2llu %s\n", static_cast<unsigned long long>(k),
                counter.log()[k].substr(0, 160).c_str());
  }
  ASSERT_GE(n, 20u);  // at least mkdir, 5 files x (create, write, fsync, close), renames

  for (uint64_t k = 0; k < n; ++k) {
    SCOPED_TRACE("failing op " + std::to_string(k) + ": " + counter.log()[k]);
    CountingFs faulty(static_cast<int64_t>(k));
    const Status s = SaveWorld(*run, dir, "state 2", faulty);
    ASSERT_FALSE(s.ok());
    EXPECT_TRUE(Contains(s.message(), "injected failure")) << s.ToString();
    EXPECT_EQ(TempDirs(dir_.path(), "ckpt"), std::vector<std::string>{});
    // DIR is checkpoint A, whole.
    std::string summary;
    ASSERT_OK(Verify(dir, &summary));
    Result<Manifest> m = ReadManifest(dir);
    ASSERT_OK(m.status());
    EXPECT_EQ(m->step, 2u);
    Result<std::string> user = ReadUserData(dir);
    ASSERT_OK(user.status());
    EXPECT_EQ(*user, "state 1");
    auto fresh = MakeWorld(1, Path("fresh"), 2);
    ASSERT_OK(fresh.status());
    ASSERT_OK(LoadWorld(*fresh, dir));
    EXPECT_EQ(Diff(*state1, *Gather(*fresh)), "");
  }

  // A first save (nothing to replace: a plain rename) that fails leaves no
  // directory at all.
  for (uint64_t k = 0; k < n; ++k) {
    SCOPED_TRACE("first save, failing op " + std::to_string(k) + ": " + counter.log()[k]);
    CountingFs faulty(static_cast<int64_t>(k));
    EXPECT_FALSE(SaveWorld(*run, Path("first"), "state 2", faulty).ok());
    EXPECT_FALSE(fs::exists(Path("first")));
    EXPECT_EQ(TempDirs(dir_.path(), "first"), std::vector<std::string>{});
  }

  // A clean save now publishes state 2, through the same operations.
  CountingFs clean;
  ASSERT_OK(SaveWorld(*run, dir, "state 2", clean));
  EXPECT_EQ(clean.ops(), n);
  EXPECT_EQ(TempDirs(dir_.path(), "ckpt"), std::vector<std::string>{});  // the old one is removed
  auto fresh = MakeWorld(1, Path("fresh"), 2);
  ASSERT_OK(fresh.status());
  ASSERT_OK(LoadWorld(*fresh, dir));
  EXPECT_EQ(Diff(*state2, *Gather(*fresh)), "");
  EXPECT_EQ(*ReadUserData(dir), "state 2");
}

// At world 2 a failure on one rank fails the save on every rank, and the
// previous checkpoint stays.
TEST_F(CheckpointTest, AFailureOnOneRankFailsTheSaveOnAll) {
  auto run = MakeWorld(2, Path("run"), 1);
  ASSERT_OK(run.status());
  ASSERT_OK(Train(*run, 1, 1));
  const std::string dir = Path("ckpt");
  ASSERT_OK(SaveWorld(*run, dir, "state 1"));
  ASSERT_OK(Train(*run, 2, 2));
  CountingFs ok_fs;
  CountingFs failing(1);  // rank 1's op 1: the first write of its data file (writer thread)
  std::vector<Status> results = OnEveryRank(2, [&](uint32_t r, const Exchange& ex) {
    return Save((*run)[r]->Access(ex), dir, Bytes("state 2"), r == 1 ? failing : ok_fs);
  });
  EXPECT_FALSE(results[0].ok());
  EXPECT_EQ(results[0].code(), StatusCode::kCancelled) << results[0].ToString();
  EXPECT_FALSE(results[1].ok());
  EXPECT_TRUE(Contains(results[1].message(), "injected failure")) << results[1].ToString();
  EXPECT_EQ(TempDirs(dir_.path(), "ckpt"), std::vector<std::string>{});
  ASSERT_OK(Verify(dir, nullptr));
  EXPECT_EQ(ReadManifest(dir)->step, 1u);

  // A rank that refuses to save (its own reason) fails it on every rank
  // before anything is written, rather than leaving the others waiting.
  results = OnEveryRank(2, [&](uint32_t r, const Exchange& ex) {
    return Save((*run)[r]->Access(ex), dir, Bytes("state 2"), ok_fs,
                r == 1 ? Status::FailedPrecondition("rank 1 is busy") : Status::Ok());
  });
  EXPECT_EQ(results[0].code(), StatusCode::kCancelled) << results[0].ToString();
  EXPECT_EQ(results[1].code(), StatusCode::kFailedPrecondition) << results[1].ToString();
  EXPECT_TRUE(Contains(results[1].message(), "rank 1 is busy")) << results[1].ToString();
  EXPECT_EQ(TempDirs(dir_.path(), "ckpt"), std::vector<std::string>{});
  EXPECT_EQ(ReadManifest(dir)->step, 1u);
}

// ---------------------------------------------------------------- 4. kill -9

// What the saving child tells the parent through a pipe: (step << 1) | done.
void Report(int fd, uint64_t message) {
  if (write(fd, &message, sizeof(message)) != sizeof(message)) _exit(20);
}

std::string UserFor(uint64_t step) { return "after step " + std::to_string(step); }

// The child: trains and saves to `dir` (replacing it) forever. Runs only in
// a freshly forked process: its engine, swapper and threads are its own.
[[noreturn]] void SaveForever(const std::string& dir, const std::string& nvme, int fd) {
  RankModel m(0, 1, nvme, /*seed=*/1);
  Status s = m.Setup();
  for (uint64_t step = 1; s.ok(); ++step) {
    s = m.Advance(step);
    if (!s.ok()) break;
    Report(fd, step << 1);
    s = Save(m.Access(), dir, Bytes(UserFor(step)));
    if (!s.ok()) break;
    Report(fd, step << 1 | 1);
  }
  std::fprintf(stderr, "kill-9 child: %s\n", s.ToString().c_str());
  _exit(10);
}

// Reads one 8-byte message; false at end of file or after `timeout_ms`.
bool ReadMessage(int fd, int timeout_ms, uint64_t* message) {
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0) return false;
  uint8_t* out = reinterpret_cast<uint8_t*>(message);
  size_t got = 0;
  while (got < sizeof(*message)) {
    const ssize_t n = read(fd, out + got, sizeof(*message) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

TEST_F(CheckpointTest, KillNineAtAnyPointLeavesALoadableCheckpoint) {
  constexpr int kTrials = 50;
  constexpr auto kBudget = std::chrono::seconds(60);
  struct Trial {
    std::string root, dir;
    uint64_t last = 0;  // the child's last message
    int sleep_ms = 0;
    std::vector<std::string> temps;  // left behind by the kill
  };
  std::vector<Trial> trials;
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> sleep_ms(0, 150);
  const auto t0 = std::chrono::steady_clock::now();

  // Phase 1: kill. The parent holds no engine (no thread) while it forks.
  for (int k = 0; k < kTrials && std::chrono::steady_clock::now() - t0 < kBudget; ++k) {
    Trial t;
    t.root = Path("kill" + std::to_string(k));
    t.dir = t.root + "/ckpt";
    fs::create_directories(t.root);
    int fds[2];
    ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
    std::fflush(nullptr);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      SaveForever(t.dir, t.root + "/nvme", fds[1]);
    }
    close(fds[1]);
    // Wait until the first save is complete, then a random moment.
    uint64_t msg = 0;
    bool first_done = false;
    while (!first_done && ReadMessage(fds[0], 30'000, &msg)) first_done = (msg & 1) != 0;
    t.sleep_ms = sleep_ms(rng);
    if (first_done) std::this_thread::sleep_for(std::chrono::milliseconds(t.sleep_ms));
    kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(first_done) << "the child never completed a save";
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the child stopped by itself (status " << status << ")";
    t.last = msg;
    while (ReadMessage(fds[0], 0, &msg)) t.last = msg;  // what it said before dying
    close(fds[0]);
    t.temps = TempDirs(t.root, "ckpt");
    trials.push_back(std::move(t));
  }
  const double kill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Phase 2: check each trial's checkpoint against an independent replay of
  // the same steps (snapshots cached by step).
  RankModel replay(0, 1, Path("replay-nvme"), /*seed=*/1);
  ASSERT_OK(replay.Setup());
  std::map<uint64_t, Full> by_step;
  int between = 0, before_publish = 0, after_publish = 0, with_temp = 0;
  uint64_t max_step = 0;
  for (size_t k = 0; k < trials.size(); ++k) {
    const Trial& t = trials[k];
    SCOPED_TRACE("trial " + std::to_string(k) + " (slept " + std::to_string(t.sleep_ms) +
                 " ms, last message: step " + std::to_string(t.last >> 1) +
                 (t.last & 1 ? " saved" : " save begun") + ")");
    std::string summary;
    ASSERT_OK(Verify(t.dir, &summary));
    Result<Manifest> m = ReadManifest(t.dir);
    ASSERT_OK(m.status());
    const uint64_t step = m->step;
    ASSERT_GE(step, 1u);
    const uint64_t said = t.last >> 1;
    if (t.last & 1) {
      // Killed between saves: the checkpoint is the last one completed.
      EXPECT_EQ(step, said);
      ++between;
    } else {
      // Killed inside save `said`: its checkpoint or the one before.
      EXPECT_TRUE(step == said || step + 1 == said) << "manifest step " << step;
      ++(step == said ? after_publish : before_publish);
    }
    with_temp += !t.temps.empty();
    max_step = std::max(max_step, step);
    while (replay.opt->step() < step) {
      ASSERT_OK(replay.Advance(replay.opt->step() + 1));
      Result<Full> f = Gather({&replay});
      ASSERT_OK(f.status());
      by_step[replay.opt->step()] = std::move(*f);
    }
    auto fresh = MakeWorld(1, t.root, 2);
    ASSERT_OK(fresh.status());
    ASSERT_OK(LoadWorld(*fresh, t.dir));
    EXPECT_EQ(Diff(by_step.at(step), *Gather(*fresh)), "");
    EXPECT_EQ(*ReadUserData(t.dir), UserFor(step));
    // The next save removes what the killed one left behind.
    ASSERT_OK(SaveWorld(*fresh, t.dir, "resumed"));
    EXPECT_EQ(TempDirs(t.root, "ckpt"), std::vector<std::string>{});
    EXPECT_OK(Verify(t.dir, nullptr));
    fresh->clear();
    fs::remove_all(t.root);
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "[ kill -9  ] %zu trials (seed %u) in %.1f s (kills %.1f s): killed between saves %d, "
      "in a save before its publish %d, after its publish %d; a temporary directory left by %d; "
      "steps reached 1..%llu\n",
      trials.size(), seed, total_s, kill_s, between, before_publish, after_publish, with_temp,
      static_cast<unsigned long long>(max_step));
  EXPECT_GE(trials.size(), 20u) << "too few trials in the time budget";
}

// ---------------------------------------------------------------- 5. damage

class CheckpointDamageTest : public CheckpointTest {
 protected:
  void SetUp() override {
    auto w = MakeWorld(1, Path("src"), 1);
    ASSERT_OK(w.status());
    ASSERT_OK(Train(*w, 1, 2));
    pristine_ = Path("pristine");
    ASSERT_OK(SaveWorld(*w, pristine_, "user"));
  }

  // A copy of the good checkpoint, damaged by `damage`.
  std::string Damaged(const std::string& name, const std::function<void(const std::string&)>& damage) {
    const std::string dir = Path(name);
    fs::copy(pristine_, dir, fs::copy_options::recursive);
    damage(dir);
    return dir;
  }

  // Verify and Load both refuse `dir` with `code`, naming `file`; returns
  // the load's message. `*wrote`: whether the load wrote to the engine.
  void ExpectRefused(const std::string& dir, StatusCode code, const std::string& file,
                     bool expect_wrote, const std::vector<std::string>& also = {}) {
    std::string summary = "untouched";
    const Status v = Verify(dir, &summary);
    EXPECT_EQ(v.code(), code) << v.ToString();
    EXPECT_TRUE(Contains(v.message(), file)) << v.ToString();
    for (const auto& s : also) EXPECT_TRUE(Contains(v.message(), s)) << v.ToString();
    EXPECT_EQ(summary, "untouched");

    auto fresh = MakeWorld(1, Path("fresh"), 2);
    ASSERT_OK(fresh.status());
    RankModel& m = *(*fresh)[0];
    m.SetPendingGrad(11, 7);
    Result<Full> before = Gather(*fresh);
    ASSERT_OK(before.status());
    bool wrote = !expect_wrote;
    Result<Manifest> l = Load(m.Access(), dir, &wrote);
    ASSERT_FALSE(l.ok());
    EXPECT_EQ(l.status().code(), code) << l.status().ToString();
    EXPECT_TRUE(Contains(l.status().message(), file)) << l.status().ToString();
    for (const auto& s : also) EXPECT_TRUE(Contains(l.status().message(), s)) << l.status().ToString();
    EXPECT_EQ(wrote, expect_wrote);
    if (!expect_wrote) {
      // Refused before anything was written: the engine is as it was.
      EXPECT_EQ(m.before_load_calls, 0);
      EXPECT_EQ(Diff(*before, *Gather(*fresh)), "");
    }
  }

  std::string pristine_;
};

TEST_F(CheckpointDamageTest, AFlippedByteInTheManifest) {
  const std::string dir = Damaged("a", [](const std::string& d) {
    std::string text = ReadFile(d + "/manifest.json");
    const size_t at = text.find("\"step\": ");
    ASSERT_NE(at, std::string::npos) << text;
    char& digit = text[at + 8];
    digit = digit == '9' ? '8' : static_cast<char>(digit + 1);  // a plausible other step
    WriteFile(d + "/manifest.json", text);
  });
  ExpectRefused(dir, StatusCode::kCorruption, dir + "/manifest.json", false, {"CRC32C"});
}

TEST_F(CheckpointDamageTest, AFlippedByteInARankIndex) {
  const std::string dir = Damaged("b", [](const std::string& d) {
    std::string text = ReadFile(d + "/rank-00000.json");
    text[text.size() / 2] ^= 0x01;
    WriteFile(d + "/rank-00000.json", text);
  });
  ExpectRefused(dir, StatusCode::kCorruption, dir + "/rank-00000.json", false);
}

TEST_F(CheckpointDamageTest, AFlippedByteInTheDataNamesTheChunk) {
  const std::string dir = Damaged("c", [](const std::string& d) {
    std::string data = ReadFile(d + "/rank-00000.bin");
    ASSERT_GT(data.size(), 1000u);
    data[data.size() / 2] ^= 0x10;
    WriteFile(d + "/rank-00000.bin", data);
  });
  // The damage is found while reading: the load has begun writing then.
  ExpectRefused(dir, StatusCode::kCorruption, dir + "/rank-00000.bin", true,
                {"chunk 0", "bytes [0, "});
}

TEST_F(CheckpointDamageTest, ATruncatedDataFile) {
  const std::string dir = Damaged("d", [](const std::string& d) {
    const auto size = fs::file_size(d + "/rank-00000.bin");
    fs::resize_file(d + "/rank-00000.bin", size / 2);
  });
  // Found from the index before the load writes anything.
  ExpectRefused(dir, StatusCode::kCorruption, dir + "/rank-00000.bin", false, {"shorter"});
}

TEST_F(CheckpointDamageTest, AMissingDirectory) {
  ExpectRefused(Path("e"), StatusCode::kNotFound, Path("e"), false, {"does not exist"});
}

TEST_F(CheckpointDamageTest, ACheckpointOfAnotherModelIsRefusedBeforeAnyWrite) {
  std::vector<ParamSpec> other = Specs();
  other[0].numel = 1000;  // embed.weight 40 x 25 instead of 37 x 29
  other[0].shape = {40, 25};
  auto w = MakeWorld(1, Path("other"), 1, other);
  ASSERT_OK(w.status());
  ASSERT_OK(Train(*w, 1, 1));
  const std::string dir = Path("f");
  ASSERT_OK(SaveWorld(*w, dir, "other"));
  ASSERT_OK(Verify(dir, nullptr));  // a good checkpoint, of another model
  auto fresh = MakeWorld(1, Path("fresh"), 2);
  ASSERT_OK(fresh.status());
  RankModel& m = *(*fresh)[0];
  m.SetPendingGrad(11, 7);
  Result<Full> before = Gather(*fresh);
  ASSERT_OK(before.status());
  bool wrote = true;
  Result<Manifest> l = Load(m.Access(), dir, &wrote);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kFailedPrecondition) << l.status().ToString();
  EXPECT_TRUE(Contains(l.status().message(), "parameter 10 ('embed.weight')")) << l.status().ToString();
  EXPECT_TRUE(Contains(l.status().message(), "1000")) << l.status().ToString();
  EXPECT_FALSE(wrote);
  EXPECT_EQ(m.before_load_calls, 0);
  EXPECT_EQ(Diff(*before, *Gather(*fresh)), "");
}

// ---------------------------------------------------------------- 6. export

TEST_F(CheckpointTest, ExportTorchIsReadByTorchLoad) {
  // Saved at world 2: the export consolidates the ranks' partitions.
  auto w = MakeWorld(2, Path("src"), 1);
  ASSERT_OK(w.status());
  ASSERT_OK(Train(*w, 1, 3));
  const std::string dir = Path("ckpt");
  ASSERT_OK(SaveWorld(*w, dir, ""));
  Result<Full> full = Gather(*w);
  ASSERT_OK(full.status());
  const std::string out = Path("weights.pt");
  ASSERT_OK(ExportTorch(dir, out));
  ASSERT_TRUE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out + ".tmp"));
  const std::string head = ReadFile(out).substr(0, 2);
  EXPECT_EQ(head, std::string("\x80\x02", 2));  // a pickle, protocol 2
  EXPECT_FALSE(ExportTorch(Path("missing"), Path("x.pt")).ok());
  EXPECT_FALSE(fs::exists(Path("x.pt")));

  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "/usr/bin/python3 cannot import torch: the file was written but not read back";
  }
  // torch reads it, with the full unpickler and with weights_only, and each
  // tensor's bytes go to a file for the comparison below.
  const std::string raw = Path("raw");
  fs::create_directories(raw);
  WriteFile(Path("read.py"),
            "import sys, torch\n"
            "path, out = sys.argv[1], sys.argv[2]\n"
            "for wo in (0, 1):\n"
            "    sd = torch.load(path, weights_only=bool(wo))\n"
            "    print('TYPE', wo, type(sd).__name__)\n"
            "    for name, t in sd.items():\n"
            "        shape = 'x'.join(str(d) for d in t.shape) or '()'\n"
            "        print('T', wo, name, str(t.dtype), shape, int(t.is_contiguous()),\n"
            "              int(t.requires_grad))\n"
            "        with open('%s/%d-%s.raw' % (out, wo, name), 'wb') as f:\n"
            "            f.write(t.contiguous().numpy().tobytes())\n");
  const std::string cmd = "/usr/bin/python3 " + Path("read.py") + " " + out + " " + raw + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string output;
  char buf[512];
  while (fgets(buf, sizeof(buf), p) != nullptr) output += buf;
  ASSERT_EQ(pclose(p), 0) << output;

  std::istringstream lines(output);
  std::string line;
  std::map<int, std::vector<std::string>> names;  // by weights_only, in file order
  while (std::getline(lines, line)) {
    std::istringstream ls(line);
    std::string kind, name, dtype, shape;
    int wo = 0, contiguous = 0, requires_grad = 0;
    ls >> kind >> wo;
    if (kind == "TYPE") {
      ls >> name;
      EXPECT_EQ(name, "OrderedDict") << line;
      continue;
    }
    ASSERT_EQ(kind, "T") << output;
    ls >> name >> dtype >> shape >> contiguous >> requires_grad;
    names[wo].push_back(name);
    const ParamSpec* spec = nullptr;
    for (const ParamSpec& s : Specs()) {
      if (s.name == name) spec = &s;
    }
    ASSERT_NE(spec, nullptr) << line;
    SCOPED_TRACE(line);
    std::string want_shape;
    // The registered shape ("()": 0-d); flat where none was given.
    for (uint64_t d : spec->name == "mask" ? std::vector<uint64_t>{spec->numel} : spec->shape) {
      want_shape += (want_shape.empty() ? "" : "x") + std::to_string(d);
    }
    if (want_shape.empty()) want_shape = "()";
    EXPECT_EQ(shape, want_shape);
    EXPECT_EQ(contiguous, 1);
    EXPECT_EQ(requires_grad, 0);
    // The master weights where the optimizer keeps them, the parameter as
    // float32 otherwise, uint8 as it is.
    std::string want;
    if (spec->has_state) {
      const auto& master = full->state.at(spec->id)[0];
      want.assign(reinterpret_cast<const char*>(master.data()), 4 * master.size());
    } else if (spec->dtype == DType::kUInt8) {
      const auto& v = full->params.at(spec->id);
      want.assign(v.begin(), v.end());
    } else {
      const auto& v = full->params.at(spec->id);
      const uint32_t eb = coordinator::DTypeBytes(spec->dtype);
      for (uint64_t i = 0; i < spec->numel; ++i) {
        const float f = AsFloat(spec->dtype, v.data() + i * eb);
        want.append(reinterpret_cast<const char*>(&f), 4);
      }
    }
    EXPECT_EQ(dtype, spec->dtype == DType::kUInt8 ? "torch.uint8" : "torch.float32");
    const std::string got = ReadFile(raw + "/" + std::to_string(wo) + "-" + name + ".raw");
    EXPECT_TRUE(got == want) << "the tensor's bytes differ (" << got.size() << " vs " << want.size() << ")";
  }
  // Every parameter, in registration order, both ways.
  std::vector<std::string> want_names;
  for (const ParamSpec& s : Specs()) want_names.push_back(s.name);
  EXPECT_EQ(names[0], want_names) << output;
  EXPECT_EQ(names[1], want_names) << output;
}

// ---------------------------------------------------------------- 7. refusals

TEST_F(CheckpointTest, SaveNeverReplacesWhatIsNotACheckpoint) {
  auto w = MakeWorld(1, Path("src"), 1);
  ASSERT_OK(w.status());
  ASSERT_OK(Train(*w, 1, 1));
  RankAccess a = (*w)[0]->Access();

  // A directory of something else.
  fs::create_directories(Path("other"));
  WriteFile(Path("other/keep.txt"), "precious");
  Status s = Save(a, Path("other"), Bytes("u"));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "is not a ztier checkpoint")) << s.ToString();
  EXPECT_EQ(ReadFile(Path("other/keep.txt")), "precious");
  EXPECT_EQ(std::distance(fs::directory_iterator(Path("other")), fs::directory_iterator()), 1);
  EXPECT_EQ(TempDirs(dir_.path(), "other"), std::vector<std::string>{});

  // A regular file.
  WriteFile(Path("file"), "precious");
  s = Save(a, Path("file"), Bytes("u"));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_EQ(ReadFile(Path("file")), "precious");
  EXPECT_EQ(TempDirs(dir_.path(), "file"), std::vector<std::string>{});

  // A symbolic link, even to a checkpoint: not followed, not replaced.
  ASSERT_OK(Save(a, Path("real"), Bytes("u")));
  fs::create_directory_symlink(Path("real"), Path("link"));
  s = Save(a, Path("link"), Bytes("u"));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_TRUE(fs::is_symlink(Path("link")));
  EXPECT_OK(Verify(Path("real"), nullptr));

  // A missing parent directory.
  s = Save(a, Path("no/such/ckpt"), Bytes("u"));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "create it first")) << s.ToString();
  EXPECT_FALSE(fs::exists(Path("no")));
  // An empty name.
  EXPECT_EQ(Save(a, "", Bytes("u")).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ztier::checkpoint
