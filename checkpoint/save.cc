// Save, SaveJob and BindRuntime (checkpoint.h).
#include "checkpoint/checkpoint.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <random>

#include "base/crc32c.h"
#include "base/log.h"
#include "checkpoint/reader.h"
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

// ---------------------------------------------------------------- save

class ShardSaver {
 public:
  ShardSaver(const RankAccess& a, Fs& fsys, std::string dir, const std::string& user)
      : a_(a), fs_(fsys), dir_(std::move(dir)), user_(user) {}

  // The parameter and gradient partitions (what training changes first).
  Status Front() {
    const std::string data_path = dir_ + "/" + DataFileName(a_.rank);
    ZTIER_ASSIGN_OR_RETURN(writer_, ShardWriter::Create(fs_, data_path, kChunkBytes));
    ZTIER_RETURN_IF_ERROR(writer_->Reserve(ExpectedBytes()));
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
    // This rank's user data, pinned by its index.
    index_.user = {UserFileName(a_.rank), user_.size(), Crc32c(user_.data(), user_.size())};
    ZTIER_RETURN_IF_ERROR(WriteSmallFile(fs_, dir_ + "/" + index_.user.name, user_));
    return WriteSmallFile(fs_, dir_ + "/" + IndexFileName(a_.rank), ShardToJson(index_));
  }
  const ShardIndex& index() const { return index_; }

 private:
  // The data file's size: the owned elements of every partition, pending
  // gradient and (three arrays of float32) optimizer state.
  uint64_t ExpectedBytes() const {
    uint64_t bytes = 0;
    for (const RankParam& p : a_.params) {
      const uint64_t n = Owned(p, a_.rank).count;
      const uint64_t eb = coordinator::DTypeBytes(p.dtype);
      bytes += n * eb * (p.has_grad ? 2 : 1);
      if (a_.optimizer != nullptr && p.segment >= 0) bytes += n * 12;
    }
    return bytes;
  }

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
  const std::string& user_;  // owned by the SaveJob
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
               const FileRef& user) {
  ZTIER_RETURN_IF_ERROR(WriteSmallFile(fsys, tmp + "/" + kConfigName, a.config_yaml));
  m.user = user;
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
  std::string user;
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
  j.user.assign(reinterpret_cast<const char*>(user.data()), user.size());
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
  j.saver = std::make_unique<ShardSaver>(j.a, fsys, j.tmp, j.user);
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
    published = all_ok ? Publish(a, j.manifest, fsys, *j.target, j.tmp, j.saver->index().user)
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

}  // namespace ztier::checkpoint
