// The "gloo" collective backend: ranks in separate processes (on one machine
// or many) over gloo's TCP transport, on the host-emulation device backend
// (device memory is host memory). Built only where gloo is found
// (ZTIER_HAVE_GLOO); without it, collective.cc answers Unavailable.
//
// Connecting: every rank listens on a TCP address, publishes it in the
// key-value store under the group's prefix and connects to every other rank
// (gloo's full mesh). The store is not used afterwards.
//
// Running a collective: as the local backend, each rank numbers its
// collectives in issue order; a call enqueues a host callback on the stream
// and the callback runs the exchange when the stream reaches it. Collectives
// run one at a time, in number order, on whichever thread reaches them (the
// stream's for AllGather and ReduceScatterMean, the caller's for
// AllGatherHost), so that the k-th exchange of every rank is the same one.
//
// Every exchange is direct between each pair of ranks (no ring): rank r sends
// its part (AllGather) or slice j of its full buffer (ReduceScatterMean) to
// each rank j and receives theirs. Each rank sends as many bytes as in a ring,
// and when a rank is lost every rank that waits for it is waiting on that
// rank's own connection, so the error names the lost rank, not a neighbour.
// Each exchange sends a header (operation, sizes) to every rank, the data
// right behind it, and posts its receives once every rank's header matched
// its own: ranks that disagree (a different trace order) fail on every rank
// with both sides named, before any data is received.
//
// Failure: a rank whose process died closes its connections, and the ranks
// waiting for it fail at once (SIGPIPE is ignored, where it was at its
// default, so that writing to such a rank fails instead of ending this
// process); a rank that does not answer within the timeout fails the wait.
// The exchange still completes with the other ranks, so that each of them
// names the lost rank itself. After any failure this rank closes all its
// connections (so that no late message lands in a buffer that was freed,
// and the other ranks stop waiting for it too) and every later call returns
// the error.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include "base/log.h"
#include "coordinator/collective.h"
#include "coordinator/collective_internal.h"

namespace ztier::coordinator {
namespace {

using tiering::DeviceBackend;
using tiering::StreamHandle;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// ---- the store ----

// gloo's Store interface over KeyValueStore callbacks.
class CallbackStore final : public gloo::rendezvous::Store {
 public:
  CallbackStore(KeyValueStore store, milliseconds timeout)
      : store_(std::move(store)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    const auto* p = reinterpret_cast<const uint8_t*>(data.data());
    Status s = store_.set(key, std::span<const uint8_t>(p, data.size()));
    if (!s.ok()) throw gloo::IoException(s.ToString());
  }

  std::vector<char> get(const std::string& key) override {
    auto value = store_.get(key, timeout_);
    if (!value.ok()) throw gloo::IoException(value.status().ToString());
    return std::vector<char>(value->begin(), value->end());
  }

  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }

  void wait(const std::vector<std::string>& keys, const milliseconds& timeout) override {
    for (const std::string& key : keys) {
      auto value = store_.get(key, timeout);
      if (!value.ok()) throw gloo::IoException(value.status().ToString());
    }
  }

 private:
  KeyValueStore store_;
  milliseconds timeout_;
};

// gloo's messages carry a source location line first; the reason is last.
std::string FirstLine(std::string_view s) {
  const size_t nl = s.find('\n');
  return std::string(nl == std::string_view::npos ? s : s.substr(0, nl));
}

// ---- one exchange ----

enum class Op : uint8_t { kAllGather = 1, kReduceScatterMean, kAllGatherHost };

// What a rank tells every other rank before an exchange (and, for
// AllGatherHost, all it tells). Plain bytes on the wire; every rank of a group
// runs the same build.
struct Header {
  uint64_t seq = 0;
  uint64_t count = 0;  // AllGather: bytes; ReduceScatterMean: elements; Host: the value
  uint8_t op = 0;
  uint8_t dtype = 0;
  uint8_t pad[6] = {};
};
static_assert(sizeof(Header) == 24);

std::string Describe(const Header& h) {
  switch (static_cast<Op>(h.op)) {
    case Op::kAllGather: return fmt::format("AllGather of {} bytes", h.count);
    case Op::kReduceScatterMean:
      return fmt::format("ReduceScatterMean of {} {} elements", h.count,
                         DTypeName(static_cast<DType>(h.dtype)));
    case Op::kAllGatherHost: return "AllGatherHost";
  }
  return fmt::format("operation {}", h.op);
}

// Message slots: every message of exchange `seq` has its own. The low 20 bits
// number the pieces of a chunked exchange (2 MiB each: up to 2 TiB per rank).
constexpr uint64_t kChunkBits = 20;
constexpr uint64_t kHeaderSlot = 0;
uint64_t SlotOf(uint64_t seq, uint64_t piece) {
  return (seq << (kChunkBits + 1)) | piece;
}
uint64_t DataSlot(uint64_t seq, uint64_t chunk) { return SlotOf(seq, (1ULL << kChunkBits) | chunk); }

// Bytes per message of a reduce-scatter: the receive buffer is
// (world - 1) x this, twice (one chunk reduced while the next arrives).
constexpr uint64_t kReduceChunkBytes = 2ULL << 20;

// The group's state, shared with the callbacks queued on streams (which may
// run after the Collective is gone).
class GlooGroup {
 public:
  GlooGroup(std::shared_ptr<gloo::rendezvous::Context> context, milliseconds timeout)
      : context_(std::move(context)),
        rank_(static_cast<uint32_t>(context_->rank)),
        world_(static_cast<uint32_t>(context_->size)),
        timeout_(timeout) {}

  ~GlooGroup() { context_->closeConnections(); }

  uint32_t rank() const { return rank_; }
  uint32_t world() const { return world_; }

  Status Failure() {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }

  // The number the next collective of this rank gets (under the caller's
  // issue lock, so numbers follow issue order).
  uint64_t TakeSeq() {
    std::lock_guard<std::mutex> lock(mu_);
    return issued_++;
  }

  // Runs exchange `seq` once every earlier one has run; returns its outcome.
  template <typename F>
  Status RunInOrder(uint64_t seq, F&& exchange) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return next_ == seq; });
    Status s = failure_;
    lock.unlock();
    if (s.ok()) {
      try {
        s = exchange();
      } catch (const std::exception& e) {  // gloo reports through exceptions
        s = Status::IoError(fmt::format("gloo collective #{} on rank {}: {}", seq, rank_,
                                        FirstLine(e.what())));
      }
    } else {
      s = s.WithContext(fmt::format("gloo collective #{} not run: the group failed earlier", seq));
    }
    if (!s.ok()) {
      // Before the exchange's buffers go: nothing may land in them (or in
      // the caller's) any more, and the other ranks must not wait for this
      // one until their timeout.
      context_->closeConnections();
    }
    buffers_.clear();
    lock.lock();
    if (!s.ok() && failure_.ok()) {
      Log(LogLevel::kError, "{}", s.message());
      failure_ = s;
    }
    ++next_;
    cv_.notify_all();
    return s;
  }

  // ---- the exchanges (run by RunInOrder) ----

  // The header alone (AllGatherHost): every rank's value, in rank order.
  Status ExchangeHeaders(const Header& mine, std::vector<uint64_t>* values) {
    Round round(*this, mine);
    PostHeaders(round, mine);
    ZTIER_RETURN_IF_ERROR(CheckHeaders(round, mine));
    values->resize(world_);
    for (uint32_t r = 0; r < world_; ++r) (*values)[r] = header_in_[r].count;
    return Status::Ok();
  }

  Status AllGather(uint64_t seq, const uint8_t* part, uint8_t* full, uint64_t bytes) {
    const Header h{seq, bytes, static_cast<uint8_t>(Op::kAllGather), 0, {}};
    Round round(*this, h);
    PostHeaders(round, h);
    uint8_t* const own = full + rank_ * bytes;
    if (bytes != 0 && part != own) std::memcpy(own, part, bytes);
    // The data is sent with the header, before the headers are checked (one
    // round trip instead of two); receives are posted only after the check:
    // gloo ends the process when a message is longer than its receive.
    const uint64_t slot = DataSlot(seq, 0);
    std::vector<gloo::transport::UnboundBuffer*> in(world_), out(world_);
    if (bytes != 0) {
      for (uint32_t p : round.peers()) {
        out[p] = Buffer(own, bytes);
        round.Post(p, [&] { out[p]->send(static_cast<int>(p), slot); });
      }
    }
    ZTIER_RETURN_IF_ERROR(CheckHeaders(round, h));
    if (bytes == 0) return Status::Ok();
    for (uint32_t p : round.peers()) {
      in[p] = Buffer(full + p * bytes, bytes);
      round.Post(p, [&] { in[p]->recv(static_cast<int>(p), slot); });
    }
    for (uint32_t p : round.peers()) round.Wait(*in[p], p, /*recv=*/true);
    for (uint32_t p : round.peers()) round.Wait(*out[p], p, /*recv=*/false);
    return round.Outcome();
  }

  Status ReduceScatterMean(uint64_t seq, const uint8_t* full, uint8_t* part, uint64_t elems,
                           DType dtype) {
    const Header h{seq, elems, static_cast<uint8_t>(Op::kReduceScatterMean),
                   static_cast<uint8_t>(dtype), {}};
    Round round(*this, h);
    PostHeaders(round, h);
    if (elems == 0) return CheckHeaders(round, h);
    const uint64_t esize = DTypeBytes(dtype);
    const uint64_t bytes = elems * esize;  // checked when issued
    // Chunks of whole elements, at most kReduceChunkBytes.
    const uint64_t chunk_elems = std::max<uint64_t>(1, kReduceChunkBytes / esize);
    const uint64_t chunks = (elems + chunk_elems - 1) / chunk_elems;
    if (chunks >= (1ULL << kChunkBits)) {
      return Status::InvalidArgument(fmt::format(
          "gloo ReduceScatterMean: {} bytes per rank is more than one exchange carries "
          "({} chunks of {} bytes)",
          bytes, (1ULL << kChunkBits) - 1, chunk_elems * esize));
    }
    auto chunk_bytes = [&](uint64_t c) {
      return std::min(chunk_elems, elems - c * chunk_elems) * esize;
    };
    // Every slice this rank sends, posted up front; gloo sends each once the
    // receiving rank has posted its receive.
    std::vector<gloo::transport::UnboundBuffer*> out(world_);
    for (uint32_t p : round.peers()) {
      out[p] = Buffer(const_cast<uint8_t*>(full + p * bytes), bytes);
      round.Post(p, [&] {
        for (uint64_t c = 0; c < chunks; ++c) {
          out[p]->send(static_cast<int>(p), DataSlot(seq, c), c * chunk_elems * esize,
                       chunk_bytes(c));
        }
      });
    }
    // Two receive areas of one chunk per rank (rank r's at r x chunk; this
    // rank's own stays unused), so chunk c+1 arrives while c is reduced.
    // Kept between exchanges: at most 2 x world x kReduceChunkBytes.
    const uint64_t area = world_ * chunk_elems * esize;
    if (scratch_.size() < 2 * area) scratch_.resize(2 * area);
    auto slice = [&](uint64_t c, uint32_t r) {
      return scratch_.data() + (c % 2) * area + r * chunk_elems * esize;
    };
    std::vector<gloo::transport::UnboundBuffer*> in[2];
    for (int a = 0; a < 2; ++a) {
      in[a].resize(world_);
      for (uint32_t p : round.peers()) in[a][p] = Buffer(slice(a, p), chunk_elems * esize);
    }
    auto post = [&](uint64_t c) {
      for (uint32_t p : round.peers()) {
        round.Post(p, [&] {
          in[c % 2][p]->recv(static_cast<int>(p), DataSlot(seq, c), 0, chunk_bytes(c));
        });
      }
    };
    // As in AllGather: the slices went out with the header; receives wait
    // for the headers to agree.
    ZTIER_RETURN_IF_ERROR(CheckHeaders(round, h));
    post(0);
    if (chunks > 1) post(1);
    std::vector<const uint8_t*> srcs(world_);
    for (uint64_t c = 0; c < chunks; ++c) {
      for (uint32_t p : round.peers()) round.Wait(*in[c % 2][p], p, /*recv=*/true);
      // With a rank lost the exchange goes on with the others (so that they
      // finish it and name the lost rank too), but reduces nothing.
      if (round.ok()) {
        const uint64_t first = c * chunk_elems;  // element
        for (uint32_t r = 0; r < world_; ++r) {
          srcs[r] = r == rank_ ? full + rank_ * bytes + first * esize : slice(c, r);
        }
        MeanOfRanks(dtype, srcs, part + first * esize, chunk_bytes(c) / esize);
      }
      if (c + 2 < chunks) post(c + 2);
    }
    for (uint32_t p : round.peers()) {
      for (uint64_t c = 0; c < chunks; ++c) round.Wait(*out[p], p, /*recv=*/false);
    }
    return round.Outcome();
  }

 private:
  class Round;

  // Sends `mine` to every rank and posts the receives of theirs.
  void PostHeaders(Round& round, const Header& mine) {
    header_out_ = mine;
    header_in_.assign(world_, Header{});
    header_bufs_.assign(2 * world_, nullptr);
    const uint64_t slot = SlotOf(mine.seq, kHeaderSlot);
    for (uint32_t p : round.peers()) {
      auto* in = header_bufs_[p] = Buffer(&header_in_[p], sizeof(Header));
      auto* out = header_bufs_[world_ + p] = Buffer(&header_out_, sizeof(Header));
      round.Post(p, [&] {
        in->recv(static_cast<int>(p), slot);
        out->send(static_cast<int>(p), slot);
      });
    }
  }

  // Waits for the headers and checks every rank's against `mine`.
  Status CheckHeaders(Round& round, const Header& mine) {
    for (uint32_t p : round.peers()) round.Wait(*header_bufs_[p], p, /*recv=*/true);
    for (uint32_t p : round.peers()) round.Wait(*header_bufs_[world_ + p], p, /*recv=*/false);
    ZTIER_RETURN_IF_ERROR(round.Outcome());
    header_in_[rank_] = mine;
    for (uint32_t p : round.peers()) {
      const Header& h = header_in_[p];
      const bool same = h.seq == mine.seq && h.op == mine.op &&
                        (mine.op == static_cast<uint8_t>(Op::kAllGatherHost) ||
                         (h.count == mine.count && h.dtype == mine.dtype));
      if (!same) {
        return Status::InvalidArgument(fmt::format(
            "gloo collective #{}: ranks disagree: rank {} issued {}, rank {} issued {} "
            "(its #{}); nothing was received (every rank must issue the same "
            "collectives, with the same sizes, in the same order: the same trace)",
            mine.seq, rank_, Describe(mine), p, Describe(h), h.seq));
      }
    }
    return Status::Ok();
  }

  // One exchange's bookkeeping per peer. A rank whose connection fails (or
  // that does not answer by the deadline) is marked and skipped; the
  // exchange goes on with the others, so that every rank still working
  // finishes it and names the lost rank itself, instead of seeing the
  // connections of a rank that gave up close and blaming that one.
  class Round {
   public:
    Round(GlooGroup& g, const Header& what)
        : g_(g), what_(what), deadline_(Clock::now() + g.timeout_), state_(g.world_) {
      for (uint32_t r = 0; r < g.world_; ++r) {
        if (r != g.rank_) peers_.push_back(r);
      }
    }

    const std::vector<uint32_t>& peers() const { return peers_; }
    bool ok() const { return failed_ == 0; }

    // Posts sends or receives to `peer` unless it is already lost.
    template <typename F>
    void Post(uint32_t peer, F&& post) {
      if (!state_[peer].cause.empty()) return;
      try {
        post();
      } catch (const std::exception& e) {
        Mark(peer, e.what());
      }
    }

    // Waits for one completion from `peer` on `buf` (its own buffer).
    void Wait(gloo::transport::UnboundBuffer& buf, uint32_t peer, bool recv) {
      if (!state_[peer].cause.empty()) return;
      try {
        const bool ok = recv ? buf.waitRecv(nullptr, Remaining())
                             : buf.waitSend(nullptr, Remaining());
        if (!ok) Mark(peer, "the wait was aborted");
      } catch (const std::exception& e) {
        Mark(peer, e.what());
      }
    }

    // The error naming every rank lost in this exchange, or OK.
    Status Outcome() const {
      if (failed_ == 0) return Status::Ok();
      std::string closed, silent, cause;
      for (uint32_t p : peers_) {
        const PeerState& st = state_[p];
        if (st.cause.empty() || st.collateral) continue;
        std::string& list = st.timed_out ? silent : closed;
        list += fmt::format("{}{}", list.empty() ? "" : ", ", p);
        if (cause.empty()) cause = st.cause;
      }
      std::string what;
      if (!closed.empty()) {
        what = fmt::format("lost rank {}: its connection closed (the process exited or was "
                           "killed, or its host is unreachable)",
                           closed);
      }
      if (!silent.empty()) {
        what += fmt::format("{}lost rank {}: no answer within {} s (comm.timeout; the rank "
                            "is hung, stopped, or slower than the timeout allows)",
                            what.empty() ? "" : "; ", silent,
                            g_.timeout_.count() / 1000.0);
      }
      return Status::IoError(fmt::format("gloo collective #{} ({}) on rank {}: {} (gloo: {})",
                                         what_.seq, Describe(what_), g_.rank_, what,
                                         FirstLine(cause)));
    }

   private:
    struct PeerState {
      std::string cause;       // gloo's message; empty while the peer is fine
      bool timed_out = false;  // this rank's wait for it ran out
      bool collateral = false; // failed only because another wait timed out
    };

    std::chrono::milliseconds Remaining() const {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline_ - Clock::now());
      return std::max(left, milliseconds(1));
    }

    void Mark(uint32_t peer, std::string_view cause) {
      PeerState& st = state_[peer];
      st.cause = std::string(cause);
      // A timed-out wait makes gloo fail every pair's pending operations
      // with this text: those ranks were not seen to fail.
      st.collateral = cause.find("Application timeout caused pair closure") !=
                      std::string_view::npos;
      st.timed_out = !st.collateral && cause.find("Timed out") != std::string_view::npos;
      if (st.collateral && failed_ == 0) st.collateral = false;  // nothing else explains it
      ++failed_;
    }

    GlooGroup& g_;
    const Header what_;
    const Clock::time_point deadline_;
    std::vector<PeerState> state_;  // by rank
    std::vector<uint32_t> peers_;   // every rank but this one
    uint32_t failed_ = 0;
  };

  // A gloo buffer over `ptr` that lives until the exchange has ended (and,
  // after a failure, until the connections are closed).
  gloo::transport::UnboundBuffer* Buffer(void* ptr, uint64_t bytes) {
    buffers_.push_back(context_->createUnboundBuffer(ptr, bytes));
    return buffers_.back().get();
  }

  const std::shared_ptr<gloo::rendezvous::Context> context_;
  const uint32_t rank_;
  const uint32_t world_;
  const milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;  // next_ moved
  uint64_t issued_ = 0;         // collectives numbered so far
  uint64_t next_ = 0;           // the number of the next exchange to run
  Status failure_;              // first error; the group is dead after it
  // Used by the exchange that runs (one at a time):
  std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> buffers_;
  Header header_out_;
  std::vector<Header> header_in_;
  std::vector<gloo::transport::UnboundBuffer*> header_bufs_;  // receives, then sends
  std::vector<uint8_t> scratch_;  // reduce-scatter receive areas
};

class GlooCollective final : public Collective {
 public:
  GlooCollective(std::shared_ptr<GlooGroup> group, DeviceBackend* device)
      : group_(std::move(group)), device_(device) {}

  std::string_view name() const override { return "gloo"; }
  uint32_t rank() const override { return group_->rank(); }
  uint32_t world_size() const override { return group_->world(); }

  Status AllGather(const void* part, void* full, uint64_t part_bytes,
                   StreamHandle stream) override {
    ZTIER_RETURN_IF_ERROR(
        CheckCollectiveBuffers("AllGather", part, full, part_bytes, rank(), world_size()));
    const auto* src = static_cast<const uint8_t*>(part);
    auto* dst = static_cast<uint8_t*>(full);
    return Issue(stream, [src, dst, part_bytes](GlooGroup& g, uint64_t seq) {
      return g.AllGather(seq, src, dst, part_bytes);
    });
  }

  Status ReduceScatterMean(const void* full, void* part, uint64_t part_elems, DType dtype,
                           StreamHandle stream) override {
    ZTIER_ASSIGN_OR_RETURN(const uint64_t bytes, MeanBytes(dtype, part_elems));
    ZTIER_RETURN_IF_ERROR(
        CheckCollectiveBuffers("ReduceScatterMean", part, full, bytes, rank(), world_size()));
    const auto* src = static_cast<const uint8_t*>(full);
    auto* dst = static_cast<uint8_t*>(part);
    return Issue(stream, [src, dst, part_elems, dtype](GlooGroup& g, uint64_t seq) {
      return g.ReduceScatterMean(seq, src, dst, part_elems, dtype);
    });
  }

  Status Health() override { return group_->Failure(); }

  Result<std::vector<uint64_t>> AllGatherHost(uint64_t value) override {
    uint64_t seq = 0;
    {
      std::lock_guard<std::mutex> lock(issue_mu_);
      ZTIER_RETURN_IF_ERROR(group_->Failure());
      seq = group_->TakeSeq();
    }
    std::vector<uint64_t> values;
    GlooGroup& g = *group_;
    ZTIER_RETURN_IF_ERROR(g.RunInOrder(seq, [&] {
      Header h{seq, value, static_cast<uint8_t>(Op::kAllGatherHost), 0, {}};
      return g.ExchangeHeaders(h, &values);
    }));
    return values;
  }

 private:
  template <typename F>
  Status Issue(StreamHandle stream, F exchange) {
    // Held across numbering and enqueueing, so that numbers follow the order
    // in which this rank's collectives reach its streams.
    std::lock_guard<std::mutex> lock(issue_mu_);
    ZTIER_RETURN_IF_ERROR(group_->Failure());
    const uint64_t seq = group_->TakeSeq();
    // A stream callback has no way to return an error: a failed exchange
    // fails the group, which Health() and every later call report. The
    // buffers stay valid until the stream moves past the callback.
    return device_->LaunchHostFunc(stream, [group = group_, seq, exchange] {
      (void)group->RunInOrder(seq, [&] { return exchange(*group, seq); });
    });
  }

  const std::shared_ptr<GlooGroup> group_;
  DeviceBackend* const device_;
  std::mutex issue_mu_;
};

// This host's address for gloo: the interface asked for, else
// $GLOO_SOCKET_IFNAME (PyTorch's variable), else the host name's address.
gloo::transport::tcp::attr AddressAttr(const GlooOptions& o) {
  gloo::transport::tcp::attr attr;
  std::string iface = o.interface;
  if (iface.empty()) {
    if (const char* env = std::getenv("GLOO_SOCKET_IFNAME")) iface = env;
  }
  if (!iface.empty()) {
    attr.iface = iface;
  } else {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "localhost");
    attr.hostname = host;
  }
  return attr;
}

Status CheckOptions(const GlooOptions& o, DeviceBackend* device) {
  if (o.world_size == 0 || o.rank >= o.world_size) {
    return Status::InvalidArgument(fmt::format(
        "gloo collective: rank {} is out of range (world size {})", o.rank, o.world_size));
  }
  if (device == nullptr || device->name() != "host") {
    return Status::InvalidArgument(fmt::format(
        "gloo collective: rank {} needs the host-emulation device backend (got '{}'); "
        "on GPUs use the nccl backend",
        o.rank, device ? device->name() : "null"));
  }
  const bool callbacks = o.store.set && o.store.get;
  if (o.store_path.empty() == !callbacks) {
    return Status::InvalidArgument(
        "gloo collective: give exactly one store: a directory every rank sees "
        "(store_path), or set/get callbacks");
  }
  if (o.timeout.count() <= 0) {
    return Status::InvalidArgument("gloo collective: the timeout must be positive");
  }
  return Status::Ok();
}

// A write to the socket of a rank that died raises SIGPIPE, whose default
// action ends this process: every surviving rank would die with the lost
// one instead of reporting it. Ignored (where nobody chose a handler), so
// the write fails with EPIPE and becomes an error naming the rank. Python
// already ignores it.
void IgnoreSigpipe() {
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) != 0) return;
  if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    (void)sigaction(SIGPIPE, &ign, nullptr);
    Log(LogLevel::kDebug, "gloo: SIGPIPE ignored (a lost rank's socket fails writes instead)");
  }
}

}  // namespace

Result<std::unique_ptr<Collective>> CreateGlooCollective(const GlooOptions& o,
                                                         DeviceBackend* device) {
  ZTIER_RETURN_IF_ERROR(CheckOptions(o, device));
  IgnoreSigpipe();
  try {
    std::unique_ptr<gloo::rendezvous::Store> base;
    if (!o.store_path.empty()) {
      base = std::make_unique<gloo::rendezvous::FileStore>(o.store_path);
    } else {
      base = std::make_unique<CallbackStore>(o.store, o.timeout);
    }
    gloo::rendezvous::PrefixStore store(o.prefix, *base);
    auto transport = gloo::transport::tcp::CreateDevice(AddressAttr(o));
    auto context = std::make_shared<gloo::rendezvous::Context>(
        static_cast<int>(o.rank), static_cast<int>(o.world_size));
    context->setTimeout(o.timeout);
    context->connectFullMesh(store, transport);
    auto group = std::make_shared<GlooGroup>(std::move(context), o.timeout);
    Log(LogLevel::kDebug, "gloo: rank {} of {} connected ({})", o.rank, o.world_size,
        transport->str());
    return std::unique_ptr<Collective>(new GlooCollective(std::move(group), device));
  } catch (const std::exception& e) {
    return Status::IoError(fmt::format(
        "gloo collective: rank {} of {} could not connect to the others within {} s "
        "(store {}, prefix '{}'): {}",
        o.rank, o.world_size, o.timeout.count() / 1000.0,
        o.store_path.empty() ? std::string("callbacks") : o.store_path, o.prefix,
        e.what()));
  }
}

bool GlooAvailable(std::string* why) {
  if (why) why->clear();
  return true;
}

}  // namespace ztier::coordinator
