#include "checkpoint/checkpoint.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <random>

#include "base/crc32c.h"
#include "base/float16.h"
#include "base/log.h"
#include "checkpoint/shard.h"

namespace ztier::checkpoint {
namespace {

namespace fs = std::filesystem;
using coordinator::DType;

// ---------------------------------------------------------------- paths

struct Target {
  std::string parent;  // existing directory
  std::string name;    // the checkpoint's name inside it
  std::string path;    // parent/name
};

Result<Target> ResolveTarget(const std::string& dir) {
  if (dir.empty()) return Status::InvalidArgument("the checkpoint directory is empty");
  fs::path p = fs::path(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // "ckpt/" -> "ckpt"
  const std::string name = p.filename().string();
  if (name.empty() || name == "." || name == "..") {
    return Status::InvalidArgument(fmt::format(
        "checkpoint directory '{}' has no name of its own (e.g. ckpt/step-100)", dir));
  }
  const fs::path parent = p.has_parent_path() ? p.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(parent, ec)) {
    return Status::InvalidArgument(fmt::format(
        "checkpoint directory '{}': its parent {} is not a directory (create it first)", dir,
        parent.string()));
  }
  return Target{parent.string(), name, p.string()};
}

std::string TempPath(const Target& t, uint64_t nonce) {
  return fmt::format("{}/.{}.tmp-{:016x}", t.parent, t.name, nonce);
}

// Temporary directories a crashed save of this name left behind.
void RemoveStaleTemps(Fs& fsys, const Target& t) {
  const std::string prefix = fmt::format(".{}.tmp-", t.name);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(t.parent, ec)) {
    const std::string n = entry.path().filename().string();
    if (n.rfind(prefix, 0) == 0 && n.size() == prefix.size() + 16) {
      Status s = fsys.RemoveAll(entry.path().string());
      if (!s.ok()) Log(LogLevel::kWarning, "checkpoint: {}", s.message());
    }
  }
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Elements of the full parameter this rank's partition holds (the padding
// past numel is not saved).
struct Span {
  uint64_t start = 0, count = 0;
};
Span Owned(const RankParam& p, uint32_t rank) {
  const uint64_t start = uint64_t{rank} * p.part_numel;
  if (start >= p.numel) return {start, 0};
  return {start, std::min(p.part_numel, p.numel - start)};
}

// ---------------------------------------------------------------- save

class ShardSaver {
 public:
  ShardSaver(const RankAccess& a, Fs& fsys, std::string dir) : a_(a), fs_(fsys), dir_(std::move(dir)) {}

  // The parameter and gradient partitions (what training changes first).
  Status Front() {
    const std::string data_path = dir_ + "/" + DataFileName(a_.rank);
    ZTIER_ASSIGN_OR_RETURN(writer_, ShardWriter::Create(fs_, data_path, kChunkBytes));
    ZTIER_RETURN_IF_ERROR(Partitions(Kind::kParam));
    return Partitions(Kind::kGrad);
  }
  // The optimizer state, then the data file made durable and the index.
  Status Rest() {
    if (a_.optimizer != nullptr) ZTIER_RETURN_IF_ERROR(State());
    ZTIER_RETURN_IF_ERROR(writer_->Finish());
    index_.rank = a_.rank;
    index_.data_file = DataFileName(a_.rank);
    index_.data_bytes = writer_->offset();
    index_.chunk_bytes = kChunkBytes;
    index_.crc32c = writer_->chunk_crcs();
    return WriteSmallFile(fs_, dir_ + "/" + IndexFileName(a_.rank), ShardToJson(index_));
  }

 private:
  Status Add(uint64_t param, Kind kind, uint64_t start, uint64_t count, const void* data,
             uint32_t elem_bytes) {
    if (count == 0) return Status::Ok();
    index_.extents.push_back({param, kind, start, count, writer_->offset()});
    return writer_->Append(data, count * elem_bytes);
  }

  // Every partition (kParam) or pending gradient partition (kGrad). The
  // next partition is read (on a helper thread) while one is appended.
  Status Partitions(Kind kind) {
    std::vector<const RankParam*> todo;
    for (const RankParam& p : a_.params) {
      if (kind == Kind::kGrad && !p.has_grad) continue;
      if (Owned(p, a_.rank).count > 0) todo.push_back(&p);
    }
    const auto& read = kind == Kind::kParam ? a_.read_param : a_.read_grad;
    std::vector<uint8_t> bufs[2];
    auto start = [&](size_t i) {
      const RankParam& p = *todo[i];
      std::vector<uint8_t>& buf = bufs[i % 2];
      buf.resize(p.part_numel * coordinator::DTypeBytes(p.dtype));
      return std::async(std::launch::async, [&read, &p, &buf, kind] {
        Status s = read(p.id, buf.data());
        return s.ok() ? s
                      : s.WithContext(fmt::format("checkpoint: read the {} partition of parameter {}",
                                                  KindName(kind), p.id));
      });
    };
    std::future<Status> ahead;
    if (!todo.empty()) ahead = start(0);
    Status status;
    for (size_t i = 0; i < todo.size(); ++i) {
      status = ahead.get();
      if (!status.ok()) break;
      if (i + 1 < todo.size()) ahead = start(i + 1);
      const RankParam& p = *todo[i];
      const Span own = Owned(p, a_.rank);
      status = Add(p.id, kind, own.start, own.count, bufs[i % 2].data(),
                   coordinator::DTypeBytes(p.dtype));
      if (!status.ok()) break;
    }
    if (ahead.valid()) (void)ahead.get();  // nothing in flight past here
    return status;
  }

  // The optimizer state, one sub-group at a time, as the swapper reads it.
  Status State() {
    const auto& segs = a_.optimizer->segments();
    std::vector<const RankParam*> by_segment(segs.size(), nullptr);
    for (const RankParam& p : a_.params) {
      if (p.segment >= 0 && static_cast<size_t>(p.segment) < segs.size()) by_segment[p.segment] = &p;
    }
    return a_.optimizer->ExportState([&](const swapper::OptimizerSwapper::StateRun<const float>& r) {
      const RankParam* p = by_segment[r.segment];
      if (p == nullptr) return Status::Internal(fmt::format("segment {} has no parameter", r.segment));
      const Span own = Owned(*p, a_.rank);
      if (r.seg_offset >= own.count) return Status::Ok();  // all padding
      const uint64_t n = std::min(r.count, own.count - r.seg_offset);
      const uint64_t start = own.start + r.seg_offset;
      ZTIER_RETURN_IF_ERROR(Add(p->id, Kind::kMaster, start, n, r.master, 4));
      ZTIER_RETURN_IF_ERROR(Add(p->id, Kind::kExpAvg, start, n, r.exp_avg, 4));
      return Add(p->id, Kind::kExpAvgSq, start, n, r.exp_avg_sq, 4);
    });
  }

  const RankAccess& a_;
  Fs& fs_;
  std::string dir_;
  std::unique_ptr<ShardWriter> writer_;
  ShardIndex index_;
};

Result<FileRef> FileRefOf(const std::string& dir, const std::string& name) {
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(dir + "/" + name, kMaxJsonBytes));
  return FileRef{name, text.size(), Crc32c(text.data(), text.size())};
}

Manifest BuildManifest(const RankAccess& a) {
  Manifest m;
  m.world_size = a.world;
  m.step = a.optimizer != nullptr ? a.optimizer->step() : 0;
  m.created = UtcNow();
  m.library_version = a.library_version;
  m.has_optimizer = a.optimizer != nullptr;
  m.groups = a.hypers;
  const auto* segs = a.optimizer != nullptr ? &a.optimizer->segments() : nullptr;
  for (const RankParam& p : a.params) {
    ParamMeta pm;
    pm.id = p.id;
    pm.name = p.name;
    pm.shape = p.shape;
    pm.numel = p.numel;
    pm.dtype = p.dtype;
    pm.has_grad = p.has_grad;
    if (segs != nullptr && p.segment >= 0) {
      pm.has_state = true;
      pm.group = (*segs)[p.segment].group;
      pm.updates = a.optimizer->updates(static_cast<uint32_t>(p.segment));
    }
    m.params.push_back(std::move(pm));
  }
  return m;
}

// Rank 0's part after every shard is durable: the small files, the
// manifest, and the publish.
Status Publish(const RankAccess& a, Manifest m, Fs& fsys, const Target& t, const std::string& tmp,
               std::span<const uint8_t> user) {
  const std::string user_text(reinterpret_cast<const char*>(user.data()), user.size());
  ZTIER_RETURN_IF_ERROR(WriteSmallFile(fsys, tmp + "/" + kUserName, user_text));
  ZTIER_RETURN_IF_ERROR(WriteSmallFile(fsys, tmp + "/" + kConfigName, a.config_yaml));
  m.user = {kUserName, user.size(), Crc32c(user.data(), user.size())};
  m.config = {kConfigName, a.config_yaml.size(), Crc32c(a.config_yaml.data(), a.config_yaml.size())};
  for (uint32_t r = 0; r < a.world; ++r) {
    ZTIER_ASSIGN_OR_RETURN(FileRef f, FileRefOf(tmp, IndexFileName(r)));
    m.ranks.push_back(f);
  }
  ZTIER_RETURN_IF_ERROR(WriteSmallFile(fsys, tmp + "/" + kManifestName, ManifestToJson(m)));
  ZTIER_RETURN_IF_ERROR(fsys.FsyncDir(tmp));
  std::error_code ec;
  const bool replace = fs::exists(fs::symlink_status(t.path, ec));
  if (replace) {
    // Only a checkpoint is replaced, never a directory of something else.
    if (!fs::is_directory(fs::symlink_status(t.path, ec)) ||
        !fs::exists(fs::path(t.path) / kManifestName, ec)) {
      return Status::FailedPrecondition(fmt::format(
          "{} exists and is not a ztier checkpoint: choose another name or remove it", t.path));
    }
  }
  ZTIER_RETURN_IF_ERROR(fsys.Rename(tmp, t.path, replace));
  if (Status synced = fsys.FsyncDir(t.parent); !synced.ok()) {
    // The publish is not durable: put DIR back as it was (the new checkpoint
    // goes back to `tmp`, which the caller removes), so that an error leaves
    // DIR unchanged rather than replaced with the previous one deleted.
    Status undone = replace ? fsys.Rename(tmp, t.path, /*exchange=*/true)
                            : fsys.Rename(t.path, tmp, /*exchange=*/false);
    if (!undone.ok()) {
      return synced.WithContext(fmt::format(
          "{} holds the new checkpoint, but it may not survive a crash, and it could not be "
          "put back ({})",
          t.path, undone.message()));
    }
    return synced;
  }
  if (replace) {
    // `tmp` now holds the previous checkpoint: no longer needed.
    Status s = fsys.RemoveAll(tmp);
    if (!s.ok()) Log(LogLevel::kWarning, "checkpoint: the previous checkpoint stays at {}: {}", tmp, s.message());
  }
  return Status::Ok();
}

// Agreement of every rank on "ok so far": an error on any rank fails all.
Result<bool> AllOk(const RankAccess& a, bool ok) {
  ZTIER_ASSIGN_OR_RETURN(std::vector<uint64_t> all, a.exchange(ok ? 1 : 0));
  return std::all_of(all.begin(), all.end(), [](uint64_t v) { return v == 1; });
}

}  // namespace

void BindRuntime(coordinator::RankRuntime& rt, RankAccess* a) {
  a->rank = rt.options().rank;
  a->world = rt.options().world_size;
  coordinator::Coordinator* c = &rt.coordinator();
  a->read_param = [c](uint64_t id, void* out) { return c->ReadPartition(id, out); };
  a->write_param = [c](uint64_t id, const void* in) { return c->WritePartition(id, in); };
  a->exchange = [c](uint64_t v) { return c->ExchangeHost(v); };
  a->optimizer = rt.optimizer();
  a->config_yaml = tiering::ConfigToYaml(rt.options().config);
}

struct SaveJob::Impl {
  RankAccess a;
  Fs* fs = nullptr;
  std::string dir;
  std::vector<uint8_t> user;
  Result<Target> target = Status::Internal("unset");
  std::string tmp;
  Status local;  // this rank's first error so far
  std::unique_ptr<ShardSaver> saver;
  Manifest manifest;  // as of Begin: the step and update counts saved
  bool state_written = false;
};

SaveJob::SaveJob() : impl_(std::make_unique<Impl>()) {}
SaveJob::~SaveJob() = default;

Result<std::unique_ptr<SaveJob>> SaveJob::Begin(const RankAccess& a, const std::string& dir,
                                                std::span<const uint8_t> user, Fs& fsys,
                                                const Status& refused) {
  // 0. Every rank willing, or none starts.
  ZTIER_ASSIGN_OR_RETURN(bool willing, AllOk(a, refused.ok()));
  if (!refused.ok()) return refused;
  if (!willing) {
    return Status::Cancelled(fmt::format(
        "checkpoint save to {}: another rank refused it (its error says why)", dir));
  }
  std::unique_ptr<SaveJob> job(new SaveJob());
  Impl& j = *job->impl_;
  j.a = a;
  j.fs = &fsys;
  j.dir = dir;
  j.user.assign(user.begin(), user.end());
  j.manifest = BuildManifest(a);
  j.target = ResolveTarget(dir);
  // 1. Rank 0 makes the temporary directory; its nonce (0: failed) goes to all.
  uint64_t nonce = 0;
  if (a.rank == 0) {
    if (j.target.ok()) {
      RemoveStaleTemps(fsys, *j.target);
      std::random_device rd;
      nonce = (uint64_t{rd()} << 32 | rd()) | 1;
      j.local = fsys.Mkdir(TempPath(*j.target, nonce));
      if (!j.local.ok()) nonce = 0;
    } else {
      j.local = j.target.status();
    }
  }
  ZTIER_ASSIGN_OR_RETURN(std::vector<uint64_t> nonces, a.exchange(nonce));
  nonce = nonces[0];
  if (nonce == 0) {
    return j.local.ok() ? Status::FailedPrecondition(
                              "checkpoint save: rank 0 could not create the checkpoint directory")
                        : j.local;
  }
  if (!j.target.ok()) j.local = j.target.status();
  if (j.target.ok()) j.tmp = TempPath(*j.target, nonce);
  // 2a. This rank's partitions: from here on training may change them.
  j.saver = std::make_unique<ShardSaver>(j.a, fsys, j.tmp);
  if (j.local.ok()) j.local = j.saver->Front();
  return job;
}

Status SaveJob::WriteState() {
  Impl& j = *impl_;
  j.state_written = true;
  if (j.local.ok()) j.local = j.saver->Rest();
  return j.local;
}

Status SaveJob::Finish() {
  Impl& j = *impl_;
  if (!j.state_written) (void)WriteState();
  const RankAccess& a = j.a;
  Fs& fsys = *j.fs;
  // 3. Rank 0 publishes once every shard is durable.
  ZTIER_ASSIGN_OR_RETURN(bool all_ok, AllOk(a, j.local.ok()));
  Status published = Status::Ok();
  if (a.rank == 0) {
    published = all_ok ? Publish(a, j.manifest, fsys, *j.target, j.tmp, j.user)
                       : Status::Cancelled("another rank failed to write its shard");
    if (!published.ok()) {
      Status s = fsys.RemoveAll(j.tmp);
      if (!s.ok()) Log(LogLevel::kWarning, "checkpoint: {}", s.message());
    }
  }
  // 4. Everyone learns the outcome.
  ZTIER_ASSIGN_OR_RETURN(bool done, AllOk(a, a.rank != 0 || published.ok()));
  const std::string& dir = j.dir;
  if (!j.local.ok()) {
    return j.local.WithContext(fmt::format("checkpoint save to {} (rank {})", dir, a.rank));
  }
  if (!published.ok()) return published.WithContext(fmt::format("checkpoint save to {}", dir));
  if (!all_ok || !done) {
    return Status::Cancelled(fmt::format(
        "checkpoint save to {}: another rank failed (its error says why); {} is unchanged", dir, dir));
  }
  return Status::Ok();
}

Status Save(const RankAccess& a, const std::string& dir, std::span<const uint8_t> user, Fs& fsys,
            const Status& refused) {
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<SaveJob> job, SaveJob::Begin(a, dir, user, fsys, refused));
  return job->Finish();
}

// ---------------------------------------------------------------- reading

namespace {

// A checkpoint opened for reading: manifest, indexes, and range reads over
// the extents of any rank.
class Opened {
 public:
  static Result<std::unique_ptr<Opened>> Open(const std::string& dir) {
    std::unique_ptr<Opened> o(new Opened());
    o->dir_ = dir;
    ZTIER_ASSIGN_OR_RETURN(o->m_, ReadManifest(dir));
    for (uint32_t r = 0; r < o->m_.world_size; ++r) {
      const FileRef& f = o->m_.ranks[r];
      const std::string path = dir + "/" + f.name;
      ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
      if (text.size() != f.bytes || Crc32c(text.data(), text.size()) != f.crc32c) {
        return Status::Corruption(fmt::format(
            "checkpoint file {}: {} bytes, CRC32C {:08x}; the manifest says {} bytes, {:08x}", path,
            text.size(), Crc32c(text.data(), text.size()), f.bytes, f.crc32c));
      }
      ZTIER_ASSIGN_OR_RETURN(ShardIndex s, ShardFromJson(text, path, o->m_));
      if (s.rank != r) return Status::Corruption(fmt::format("{} describes rank {}", path, s.rank));
      // A missing or truncated data file is found here, before a load
      // changes anything.
      const std::string data = dir + "/" + s.data_file;
      struct stat st {};
      if (stat(data.c_str(), &st) != 0 || !S_ISREG(st.st_mode) ||
          static_cast<uint64_t>(st.st_size) < s.data_bytes) {
        return Status::Corruption(fmt::format(
            "checkpoint data file {} is missing or shorter than the {} bytes its index gives "
            "(truncated?)",
            data, s.data_bytes));
      }
      o->shards_.push_back(std::move(s));
    }
    o->readers_.resize(o->shards_.size());
    for (uint32_t r = 0; r < o->shards_.size(); ++r) {
      for (const Extent& e : o->shards_[r].extents) o->by_key_[{e.param, e.kind}].push_back({r, &e});
    }
    for (auto& [key, list] : o->by_key_) {
      std::sort(list.begin(), list.end(),
                [](const Ref& x, const Ref& y) { return x.e->start < y.e->start; });
    }
    for (const ParamMeta& p : o->m_.params) o->params_[p.id] = &p;
    return o;
  }

  const Manifest& manifest() const { return m_; }
  const std::vector<ShardIndex>& shards() const { return shards_; }

  // Copies elements [lo, hi) of (param, kind) into `out`, which must be
  // fully covered by saved extents.
  Status ReadRange(const ParamMeta& p, Kind kind, uint64_t lo, uint64_t hi, uint8_t* out) {
    const uint32_t eb = KindBytes(kind, p.dtype);
    auto it = by_key_.find({p.id, kind});
    uint64_t next = lo;  // elements below `next` are filled
    if (it != by_key_.end()) {
      for (const Ref& ref : it->second) {
        const Extent& e = *ref.e;
        if (next >= hi) break;
        if (e.start + e.count <= next) continue;
        if (e.start > next) break;  // a gap: reported below
        const uint64_t end = std::min(hi, e.start + e.count);
        ZTIER_ASSIGN_OR_RETURN(ShardReader * rd, Reader(ref.rank));
        ZTIER_RETURN_IF_ERROR(rd->Read(e.offset + (next - e.start) * eb, (end - next) * eb,
                                       out + (next - lo) * eb));
        next = end;
      }
    }
    if (next < hi) {
      return Status::Corruption(fmt::format(
          "checkpoint {}: elements [{}, {}) of the {} of parameter {} are in no shard", dir_, next,
          hi, KindName(kind), p.id));
    }
    return Status::Ok();
  }

  // Rank r's data file, opened on first use. At most kOpenReaders are open
  // at once (each holds two read windows), whatever the saved world size:
  // the least recently used is closed.
  Result<ShardReader*> Reader(uint32_t r) {
    if (readers_[r] == nullptr) {
      std::erase(recent_, r);
      if (recent_.size() >= kOpenReaders) {
        readers_[recent_.front()].reset();
        recent_.erase(recent_.begin());
      }
      const ShardIndex& s = shards_[r];
      ZTIER_ASSIGN_OR_RETURN(readers_[r], ShardReader::Open(dir_ + "/" + s.data_file, s.data_bytes,
                                                            s.chunk_bytes, s.crc32c));
    }
    if (recent_.empty() || recent_.back() != r) {
      std::erase(recent_, r);
      recent_.push_back(r);
    }
    return readers_[r].get();
  }

 private:
  struct Ref {
    uint32_t rank;
    const Extent* e;
  };
  std::string dir_;
  Manifest m_;
  std::vector<ShardIndex> shards_;
  std::map<std::pair<uint64_t, Kind>, std::vector<Ref>> by_key_;
  std::map<uint64_t, const ParamMeta*> params_;
  static constexpr size_t kOpenReaders = 2;
  std::vector<std::unique_ptr<ShardReader>> readers_;
  std::vector<uint32_t> recent_;  // open readers, least recently used first
};

// The engine must hold what was saved: same parameters, same optimizer layout.
Status CheckCompatible(const RankAccess& a, const Manifest& m, const std::string& dir) {
  std::map<uint64_t, const ParamMeta*> saved;
  for (const ParamMeta& p : m.params) saved[p.id] = &p;
  for (const RankParam& p : a.params) {
    auto it = saved.find(p.id);
    if (it == saved.end()) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {} has no parameter {} ('{}'): it was saved from another model", dir, p.id,
          p.name));
    }
    const ParamMeta& s = *it->second;
    if (s.numel != p.numel || s.dtype != p.dtype) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} ('{}') was saved with {} elements of {}, this model has {} "
          "of {}",
          dir, p.id, p.name, s.numel, coordinator::DTypeName(s.dtype), p.numel,
          coordinator::DTypeName(p.dtype)));
    }
    const bool has_state = p.segment >= 0 && a.optimizer != nullptr;
    if (m.has_optimizer && has_state != s.has_state) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} ('{}') {} optimizer state in the checkpoint but {} here "
          "(create the optimizer with the same parameters and groups as the saved run)",
          dir, p.id, p.name, s.has_state ? "has" : "has no", has_state ? "has" : "has none"));
    }
    if (has_state && s.has_state && s.group != a.optimizer->segments()[p.segment].group) {
      return Status::FailedPrecondition(fmt::format(
          "checkpoint {}: parameter {} is in group {} in the checkpoint, {} here", dir, p.id,
          s.group, a.optimizer->segments()[p.segment].group));
    }
  }
  if (saved.size() != a.params.size()) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} holds {} parameters, this model registers {}", dir, saved.size(),
        a.params.size()));
  }
  if (m.has_optimizer != (a.optimizer != nullptr)) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} {} optimizer state and this engine {} an optimizer (create it before the "
        "load, as in the saved run)",
        dir, m.has_optimizer ? "holds" : "holds no", a.optimizer != nullptr ? "has" : "has no"));
  }
  if (m.has_optimizer && m.groups.size() != a.hypers.size()) {
    return Status::FailedPrecondition(fmt::format(
        "checkpoint {} has {} parameter groups, this optimizer {}", dir, m.groups.size(),
        a.hypers.size()));
  }
  return Status::Ok();
}

}  // namespace

Result<Manifest> ReadManifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestName;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return Status::NotFound(fmt::format("checkpoint {} does not exist (no such directory)", dir));
  }
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
  return ManifestFromJson(text, path);
}

Result<std::string> ReadUserData(const std::string& dir) {
  ZTIER_ASSIGN_OR_RETURN(Manifest m, ReadManifest(dir));
  const std::string path = dir + "/" + m.user.name;
  ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
  if (text.size() != m.user.bytes || Crc32c(text.data(), text.size()) != m.user.crc32c) {
    return Status::Corruption(fmt::format(
        "checkpoint file {}: {} bytes or its CRC32C differ from the manifest's", path, text.size()));
  }
  return text;
}

Result<Loaded> Load(const RankAccess& a, const std::string& dir, bool* wrote) {
  if (wrote != nullptr) *wrote = false;
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<Opened> ck, Opened::Open(dir));
  const Manifest& m = ck->manifest();
  ZTIER_RETURN_IF_ERROR(CheckCompatible(a, m, dir));
  if (wrote != nullptr) *wrote = true;
  if (a.before_load) a.before_load();
  std::map<uint64_t, const ParamMeta*> saved;
  for (const ParamMeta& p : m.params) saved[p.id] = &p;
  std::vector<uint8_t> buf;
  for (const RankParam& p : a.params) {
    const ParamMeta& s = *saved.at(p.id);
    const Span own = Owned(p, a.rank);
    const uint32_t eb = coordinator::DTypeBytes(p.dtype);
    for (Kind kind : {Kind::kParam, Kind::kGrad}) {
      if (kind == Kind::kGrad && !s.has_grad) continue;
      buf.assign(p.part_numel * eb, 0);  // the padding stays zero
      if (own.count > 0) {
        ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, kind, own.start, own.start + own.count, buf.data()));
      }
      const auto& write = kind == Kind::kParam ? a.write_param : a.write_grad;
      Status w = write(p.id, buf.data());
      if (!w.ok()) {
        return w.WithContext(fmt::format("checkpoint load: write the {} partition of parameter {}",
                                         KindName(kind), p.id));
      }
    }
  }
  if (a.optimizer != nullptr) {
    const auto& segs = a.optimizer->segments();
    std::vector<const RankParam*> by_segment(segs.size(), nullptr);
    std::vector<uint64_t> updates(segs.size(), 0);
    for (const RankParam& p : a.params) {
      if (p.segment < 0) continue;
      by_segment[p.segment] = &p;
      updates[p.segment] = saved.at(p.id)->updates;
    }
    Status s = a.optimizer->ImportState(
        m.step, updates, [&](const swapper::OptimizerSwapper::StateRun<float>& r) -> Status {
          const RankParam* p = by_segment[r.segment];
          if (p == nullptr) return Status::Internal("a segment has no parameter");
          const Span own = Owned(*p, a.rank);
          if (r.seg_offset >= own.count) return Status::Ok();  // padding: zero
          const uint64_t lo = own.start + r.seg_offset;
          const uint64_t hi = lo + std::min(r.count, own.count - r.seg_offset);
          const ParamMeta& s = *saved.at(p->id);
          ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, Kind::kMaster, lo, hi, reinterpret_cast<uint8_t*>(r.master)));
          ZTIER_RETURN_IF_ERROR(ck->ReadRange(s, Kind::kExpAvg, lo, hi, reinterpret_cast<uint8_t*>(r.exp_avg)));
          return ck->ReadRange(s, Kind::kExpAvgSq, lo, hi, reinterpret_cast<uint8_t*>(r.exp_avg_sq));
        });
    ZTIER_RETURN_IF_ERROR(s);
  }
  Loaded out;
  out.manifest = m;
  out.hypers = m.groups;
  return out;
}

Status Verify(const std::string& dir, std::string* summary) {
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<Opened> ck, Opened::Open(dir));
  const Manifest& m = ck->manifest();
  ZTIER_RETURN_IF_ERROR(ReadUserData(dir).status());
  {
    const std::string path = dir + "/" + m.config.name;
    ZTIER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxJsonBytes));
    if (text.size() != m.config.bytes || Crc32c(text.data(), text.size()) != m.config.crc32c) {
      return Status::Corruption(fmt::format("checkpoint file {}: differs from the manifest's size or CRC32C", path));
    }
  }
  uint64_t bytes = 0;
  for (uint32_t r = 0; r < ck->shards().size(); ++r) {
    ZTIER_ASSIGN_OR_RETURN(ShardReader * rd, ck->Reader(r));
    ZTIER_RETURN_IF_ERROR(rd->CheckAll());
    bytes += ck->shards()[r].data_bytes;
  }
  // Every parameter complete in every kind it claims, from any rank.
  uint64_t elements = 0;
  for (const ParamMeta& p : m.params) {
    elements += p.numel;
    std::vector<Kind> kinds{Kind::kParam};
    if (p.has_grad) kinds.push_back(Kind::kGrad);
    if (p.has_state) kinds.insert(kinds.end(), {Kind::kMaster, Kind::kExpAvg, Kind::kExpAvgSq});
    std::vector<uint8_t> window;
    for (Kind k : kinds) {
      const uint32_t eb = KindBytes(k, p.dtype);
      const uint64_t step = std::max<uint64_t>(1, (4ull << 20) / eb);
      window.resize(std::min(step, std::max<uint64_t>(p.numel, 1)) * eb);
      for (uint64_t lo = 0; lo < p.numel; lo += step) {
        ZTIER_RETURN_IF_ERROR(ck->ReadRange(p, k, lo, std::min(p.numel, lo + step), window.data()));
      }
    }
  }
  if (summary != nullptr) {
    *summary = fmt::format(
        "checkpoint {}: valid (format {}, step {}, world size {}, {} parameters, {} elements, "
        "{} data bytes, optimizer state {}, saved {})",
        dir, kManifestFormat, m.step, m.world_size, m.params.size(), elements, bytes,
        m.has_optimizer ? "yes" : "no", m.created);
  }
  return Status::Ok();
}

// ---------------------------------------------------------------- export

namespace {

// Just enough of Python's pickle (protocol 2) to write torch's own
// (non-zip) serialization: a magic number, a protocol version, system info,
// an OrderedDict of tensors whose storages are persistent ids, the storage
// keys, then each storage's element count and bytes.
class Pickle {
 public:
  void Proto() { Op("\x80\x02", 2); }
  void Stop() { Op(".", 1); }
  void Mark() { Op("(", 1); }
  void Global(const char* module, const char* name) { out_ += fmt::format("c{}\n{}\n", module, name); }
  void EmptyTuple() { Op(")", 1); }
  void Tuple() { Op("t", 1); }
  void Reduce() { Op("R", 1); }
  void BinPersId() { Op("Q", 1); }
  void EmptyDict() { Op("}", 1); }
  void EmptyList() { Op("]", 1); }
  void SetItems() { Op("u", 1); }
  void Appends() { Op("e", 1); }
  void Bool(bool b) { Op(b ? "\x88" : "\x89", 1); }
  void None() { Op("N", 1); }
  void Str(const std::string& s) {
    Op("X", 1);
    Le(static_cast<uint64_t>(s.size()), 4);
    out_ += s;
  }
  void Int(uint64_t v) {
    if (v < (1ull << 31)) {
      Op("J", 1);
      Le(v, 4);
    } else {  // LONG1: little-endian two's complement; 9 bytes keep it positive
      Op("\x8a", 1);
      out_.push_back(static_cast<char>(9));
      Le(v, 8);
      out_.push_back('\0');
    }
  }
  // A Python int of any size given as little-endian bytes (positive).
  void Long(const std::string& le_bytes) {
    Op("\x8a", 1);
    out_.push_back(static_cast<char>(le_bytes.size()));
    out_ += le_bytes;
  }
  std::string& bytes() { return out_; }

 private:
  void Op(const char* op, size_t n) { out_.append(op, n); }
  void Le(uint64_t v, int n) {
    for (int k = 0; k < n; ++k) out_.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
  }
  std::string out_;
};

struct ExportItem {
  const ParamMeta* p;
  Kind kind;           // kMaster or kParam
  DType out_dtype;     // float32, or uint8 kept as is
};

const char* StorageClass(DType t) { return t == DType::kUInt8 ? "ByteStorage" : "FloatStorage"; }

std::string ExportHeader(const std::vector<ExportItem>& items) {
  Pickle pk;
  // torch's magic number 0x1950a86a20f9469cfc6c and protocol version 1001.
  pk.Proto();
  pk.Long(std::string("\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", 10));
  pk.Stop();
  pk.Proto();
  pk.Int(1001);
  pk.Stop();
  pk.Proto();
  pk.EmptyDict();
  pk.Mark();
  pk.Str("protocol_version");
  pk.Int(1001);
  pk.Str("little_endian");
  pk.Bool(true);
  pk.Str("type_sizes");
  pk.EmptyDict();
  pk.Mark();
  pk.Str("short");
  pk.Int(2);
  pk.Str("int");
  pk.Int(4);
  pk.Str("long");
  pk.Int(4);
  pk.SetItems();
  pk.SetItems();
  pk.Stop();
  // The state dict.
  pk.Proto();
  pk.Global("collections", "OrderedDict");
  pk.EmptyTuple();
  pk.Reduce();
  pk.Mark();
  for (size_t k = 0; k < items.size(); ++k) {
    const ParamMeta& p = *items[k].p;
    pk.Str(p.name.empty() ? fmt::format("param.{}", p.id) : p.name);
    pk.Global("torch._utils", "_rebuild_tensor_v2");
    pk.Mark();
    pk.Mark();  // the persistent id
    pk.Str("storage");
    pk.Global("torch", StorageClass(items[k].out_dtype));
    pk.Str(fmt::format("{:08d}", k));
    pk.Str("cpu");
    pk.Int(p.numel);
    pk.None();
    pk.Tuple();
    pk.BinPersId();
    pk.Int(0);  // storage offset
    // Size and contiguous strides: the registered shape (0-d included),
    // else flat.
    std::vector<uint64_t> shape = p.shape ? *p.shape : std::vector<uint64_t>{p.numel};
    std::vector<uint64_t> stride(shape.size(), 1);
    for (size_t d = shape.size(); d-- > 1;) stride[d - 1] = stride[d] * shape[d];
    pk.Mark();
    for (uint64_t x : shape) pk.Int(x);
    pk.Tuple();
    pk.Mark();
    for (uint64_t x : stride) pk.Int(x);
    pk.Tuple();
    pk.Bool(false);  // requires_grad
    pk.Global("collections", "OrderedDict");
    pk.EmptyTuple();
    pk.Reduce();
    pk.Tuple();
    pk.Reduce();
  }
  pk.SetItems();
  pk.Stop();
  // The storage keys, in the order their data follows (sorted as strings).
  pk.Proto();
  pk.EmptyList();
  pk.Mark();
  for (size_t k = 0; k < items.size(); ++k) pk.Str(fmt::format("{:08d}", k));
  pk.Appends();
  pk.Stop();
  return std::move(pk.bytes());
}

float ToF32(const uint8_t* src, DType t) {
  uint16_t h;
  switch (t) {
    case DType::kFloat16: memcpy(&h, src, 2); return HalfToFloat(h);
    case DType::kBFloat16: memcpy(&h, src, 2); return Bf16ToFloat(h);
    default: {
      float f;
      memcpy(&f, src, 4);
      return f;
    }
  }
}

}  // namespace

Status ExportTorch(const std::string& dir, const std::string& out_path) {
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<Opened> ck, Opened::Open(dir));
  const Manifest& m = ck->manifest();
  std::vector<ExportItem> items;
  for (const ParamMeta& p : m.params) {
    if (p.dtype == DType::kUInt8) {
      items.push_back({&p, Kind::kParam, DType::kUInt8});
    } else {
      items.push_back({&p, p.has_state ? Kind::kMaster : Kind::kParam, DType::kFloat32});
    }
  }
  const std::string tmp = out_path + ".tmp";
  Fs& fsys = Fs::Posix();
  std::error_code ec;
  fs::remove(tmp, ec);
  ZTIER_ASSIGN_OR_RETURN(int fd, fsys.Create(tmp, /*direct=*/false, nullptr));
  uint64_t off = 0;
  auto put = [&](const void* data, uint64_t n) {
    Status s = fsys.Write(fd, data, n, off, tmp);
    off += n;
    return s;
  };
  const std::string header = ExportHeader(items);
  Status status = put(header.data(), header.size());
  std::vector<uint8_t> in;
  std::vector<float> conv;
  for (const ExportItem& it : items) {
    if (!status.ok()) break;
    const ParamMeta& p = *it.p;
    const uint64_t numel = p.numel;
    status = put(&numel, 8);  // the storage's element count, then its bytes
    const uint32_t eb = KindBytes(it.kind, p.dtype);
    const uint64_t step = (4ull << 20) / 4;  // elements per piece (16 MiB of fp32 at most)
    for (uint64_t lo = 0; lo < numel && status.ok(); lo += step) {
      const uint64_t n = std::min(step, numel - lo);
      in.resize(n * eb);
      status = ck->ReadRange(p, it.kind, lo, lo + n, in.data());
      if (!status.ok()) break;
      if (it.out_dtype == DType::kUInt8 || (it.kind == Kind::kParam && p.dtype == DType::kFloat32) ||
          it.kind == Kind::kMaster) {
        status = put(in.data(), in.size());
      } else {
        conv.resize(n);
        for (uint64_t i = 0; i < n; ++i) conv[i] = ToF32(in.data() + i * eb, p.dtype);
        status = put(conv.data(), n * 4);
      }
    }
  }
  if (status.ok()) status = fsys.Fsync(fd, tmp);
  Status closed = fsys.Close(fd, tmp);
  if (status.ok()) status = closed;
  if (status.ok() && rename(tmp.c_str(), out_path.c_str()) != 0) {
    status = Status::IoError(fmt::format("rename {} to {}: {}", tmp, out_path, strerror(errno)));
  }
  if (!status.ok()) fs::remove(tmp, ec);
  return status;
}

}  // namespace ztier::checkpoint
