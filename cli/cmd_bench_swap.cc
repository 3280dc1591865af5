// `ztier bench swap`: swap-in and swap-out throughput of many partitions
// through the parameter swapper, side by side with the engine's plain
// sequential read and write of the same store file at the same block size
// and queue depth (what `ztier bench io --rw read/write` measures), so the
// swapper's own cost shows as a ratio.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "swapper/param_swapper.h"

namespace ztier::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct SwapArgs {
  std::string dir;
  std::string backend = "auto";
  std::string partition_size = "16MiB", bs = "1MiB", buffer_size = "16MiB";
  uint32_t partitions = 96, qd = 32, buffers = 32, runs = 3;
  bool no_checksum = false, json = false;
};

struct RunResult {
  double io_read_bw = 0, swap_in_bw = 0, io_write_bw = 0, swap_out_bw = 0;  // bytes/s
};

struct Bench {
  SwapArgs a;
  uint64_t part_bytes = 0, bs = 0, buffer_bytes = 0;
  std::unique_ptr<tiering::PinnedPool> pool;
  std::unique_ptr<io::AsyncEngine> engine;
  std::unique_ptr<swapper::ParamSwapper> swapper;
  io::BackendKind kind = io::BackendKind::kAuto;

  Status Setup() {
    ZTIER_ASSIGN_OR_RETURN(part_bytes, ParseSize(a.partition_size));
    ZTIER_ASSIGN_OR_RETURN(bs, ParseSize(a.bs));
    ZTIER_ASSIGN_OR_RETURN(buffer_bytes, ParseSize(a.buffer_size));
    ZTIER_ASSIGN_OR_RETURN(kind, io::ParseBackendKind(a.backend));
    tiering::PoolOptions po;
    po.buffer_count = a.buffers;
    po.buffer_bytes = buffer_bytes;
    po.allow_unpinned = true;
    ZTIER_ASSIGN_OR_RETURN(pool, tiering::PinnedPool::Create(po));
    ZTIER_ASSIGN_OR_RETURN(engine, NewEngine());
    swapper::SwapperOptions so;
    so.store.paths = {a.dir};
    so.store.tag = "bench";
    so.store.stripe_bytes = bs;
    so.checksum = !a.no_checksum;
    ZTIER_ASSIGN_OR_RETURN(swapper, swapper::ParamSwapper::Create(so, pool.get(), engine.get()));
    for (uint32_t i = 0; i < a.partitions; ++i) ZTIER_RETURN_IF_ERROR(swapper->Add(i, part_bytes));
    ZTIER_RETURN_IF_ERROR(swapper->Seal());
    std::vector<uint8_t> data(part_bytes);
    for (uint32_t i = 0; i < a.partitions; ++i) {
      for (uint64_t k = 0; k < part_bytes; k += 4096) data[k] = static_cast<uint8_t>(i + k);
      ZTIER_RETURN_IF_ERROR(swapper->Write(i, data.data()));
    }
    return Status::Ok();
  }

  Result<std::unique_ptr<io::AsyncEngine>> NewEngine() {
    io::BackendOptions bo;
    bo.queue_depth = a.qd;
    ZTIER_ASSIGN_OR_RETURN(auto backend, io::CreateBackend(kind, bo));
    io::EngineOptions eo;
    eo.block_size = bs;
    eo.queue_depth = a.qd;
    ZTIER_ASSIGN_OR_RETURN(auto e, io::Engine::Create(std::move(backend), eo));
    return io::AsyncEngine::Create(std::move(e));
  }

  // `ztier bench io`'s sequential read or write (the same code: queue_depth
  // requests of bs bytes into a ring of buffers) over the store's own files,
  // as many bytes as the partitions take.
  Result<double> PlainIo(io::Op op) {
    IoBenchOptions o;
    o.backend = a.backend;
    o.rw = op == io::Op::kRead ? "read" : "write";
    o.bs = a.bs;
    o.qd = a.qd;
    o.size = std::to_string(swapper->store().used());
    o.files = swapper->store().file_paths();
    o.progress = false;
    ZTIER_ASSIGN_OR_RETURN(IoBenchResult r, RunIoBenchmark(o));
    return r.bw_bytes_per_s;
  }

  // Swaps every partition in, keeping the pool busy: as soon as one is waited
  // for and released, more reads are started.
  Result<double> SwapIn() {
    std::vector<uint64_t> ids(a.partitions);
    for (uint32_t i = 0; i < a.partitions; ++i) ids[i] = i;
    size_t next = 0;
    std::deque<uint64_t> held;
    const auto t0 = Clock::now();
    while (next < ids.size() || !held.empty()) {
      if (next < ids.size()) {
        ZTIER_ASSIGN_OR_RETURN(size_t got,
                               swapper->SwapIn(std::span<const uint64_t>(ids).subspan(next)));
        for (size_t k = 0; k < got; ++k) held.push_back(ids[next + k]);
        next += got;
      }
      if (held.empty()) continue;
      ZTIER_RETURN_IF_ERROR(swapper->Wait(held.front()));
      ZTIER_RETURN_IF_ERROR(swapper->ReleaseBuffer(held.front()));
      held.pop_front();
    }
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    return double(part_bytes) * a.partitions / s;
  }

  // Writes every partition back from swap buffers: a batch is swapped in
  // (not timed), then written back asynchronously (timed).
  Result<double> SwapOut() {
    double seconds = 0;
    const uint32_t per_batch = std::max<uint32_t>(1, a.buffers / pool->BuffersFor(part_bytes));
    for (uint32_t first = 0; first < a.partitions; first += per_batch) {
      std::vector<uint64_t> ids;
      for (uint32_t i = first; i < std::min(a.partitions, first + per_batch); ++i) ids.push_back(i);
      ZTIER_ASSIGN_OR_RETURN(size_t got, swapper->SwapIn(ids));
      if (got != ids.size()) return Status::Internal("swap-out batch did not fit the pool");
      for (uint64_t id : ids) ZTIER_RETURN_IF_ERROR(swapper->Wait(id));
      const auto t0 = Clock::now();
      for (uint64_t id : ids) ZTIER_RETURN_IF_ERROR(swapper->SwapOut(id));
      ZTIER_RETURN_IF_ERROR(swapper->WaitAll());
      seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    }
    return double(part_bytes) * a.partitions / seconds;
  }
};

int RunBenchSwap(const SwapArgs& args) {
  Bench b;
  b.a = args;
  if (b.a.dir.empty()) {
    const char* env = getenv("ZTIER_NVME_PATH");
    b.a.dir = env && *env ? env : "ztier_nvme";
  }
  if (Status s = b.Setup(); !s.ok()) {
    fprintf(stderr, "ztier bench swap: %s\n", s.ToString().c_str());
    return ExitCodeFor(s);
  }
  std::vector<RunResult> runs;
  for (uint32_t r = 0; r < b.a.runs; ++r) {
    RunResult rr;
    // Alternate which side goes first (ABBA), so a drive that slows down
    // during a run (burst credits, thermal) does not favour one side.
    const bool swapper_first = r % 2 == 1;
    Result<double> io_read = 0.0, in = 0.0;
    if (swapper_first) {
      in = b.SwapIn();
      io_read = b.PlainIo(io::Op::kRead);
    } else {
      io_read = b.PlainIo(io::Op::kRead);
      in = b.SwapIn();
    }
    // The plain write overwrites the store: after it the partitions are
    // rewritten through the swapper so the next run reads valid data.
    Result<double> out = 0.0, io_write = 0.0;
    if (swapper_first) {
      out = b.SwapOut();
      io_write = b.PlainIo(io::Op::kWrite);
    } else {
      io_write = b.PlainIo(io::Op::kWrite);
      std::vector<uint8_t> fill(b.part_bytes, 1);
      for (uint32_t i = 0; i < b.a.partitions && io_write.ok(); ++i) {
        if (Status s = b.swapper->Write(i, fill.data()); !s.ok()) io_write = s;
      }
      out = b.SwapOut();
    }
    for (const auto* st : {&io_read.status(), &in.status(), &out.status(), &io_write.status()}) {
      if (!st->ok()) {
        fprintf(stderr, "ztier bench swap: %s\n", st->ToString().c_str());
        return ExitCodeFor(*st);
      }
    }
    rr = {*io_read, *in, *io_write, *out};
    std::vector<uint8_t> data(b.part_bytes, 1);
    for (uint32_t i = 0; i < b.a.partitions; ++i) {
      if (Status s = b.swapper->Write(i, data.data()); !s.ok()) {
        fprintf(stderr, "ztier bench swap: %s\n", s.ToString().c_str());
        return ExitCodeFor(s);
      }
    }
    runs.push_back(rr);
    if (!b.a.json) {
      fprintf(stderr,
              "run %u: io read %.2f GB/s, swap-in %.2f GB/s (%.3f); io write %.2f GB/s, "
              "swap-out %.2f GB/s (%.3f)\n",
              r + 1, rr.io_read_bw / 1e9, rr.swap_in_bw / 1e9, rr.swap_in_bw / rr.io_read_bw,
              rr.io_write_bw / 1e9, rr.swap_out_bw / 1e9, rr.swap_out_bw / rr.io_write_bw);
    }
  }
  std::vector<double> in_ratio, out_ratio, io_r, io_w, sin, sout;
  for (const auto& r : runs) {
    in_ratio.push_back(r.swap_in_bw / r.io_read_bw);
    out_ratio.push_back(r.swap_out_bw / r.io_write_bw);
    io_r.push_back(r.io_read_bw);
    io_w.push_back(r.io_write_bw);
    sin.push_back(r.swap_in_bw);
    sout.push_back(r.swap_out_bw);
  }
  const uint64_t total = b.part_bytes * b.a.partitions;
  if (b.a.json) {
    nlohmann::json j = {
        {"partitions", b.a.partitions}, {"partition_bytes", b.part_bytes},
        {"bytes", total}, {"bs", b.bs}, {"qd", b.a.qd}, {"buffers", b.a.buffers},
        {"buffer_bytes", b.pool->buffer_bytes()}, {"checksum", !b.a.no_checksum},
        {"runs", b.a.runs},
        {"io_read_bw_bytes_per_s", Median(io_r)}, {"swap_in_bw_bytes_per_s", Median(sin)},
        {"swap_in_ratio", Median(in_ratio)},
        {"io_write_bw_bytes_per_s", Median(io_w)}, {"swap_out_bw_bytes_per_s", Median(sout)},
        {"swap_out_ratio", Median(out_ratio)}};
    printf("%s\n", WithRunInfo(std::move(j)).dump().c_str());
    return 0;
  }
  printf("swap bench: %u partitions x %s = %s on %s, bs %s, qd %u, %u buffers x %s, checksum %s\n",
         b.a.partitions, FormatSize(b.part_bytes).c_str(), FormatSize(total).c_str(),
         b.swapper->store().file().Describe().c_str(), FormatSize(b.bs).c_str(), b.a.qd,
         b.a.buffers, FormatSize(b.pool->buffer_bytes()).c_str(),
         b.a.no_checksum ? "off" : "crc32c");
  printf("median of %u runs:\n", b.a.runs);
  printf("  read : engine %.2f GB/s, swap-in  %.2f GB/s, ratio %.3f\n", Median(io_r) / 1e9,
         Median(sin) / 1e9, Median(in_ratio));
  printf("  write: engine %.2f GB/s, swap-out %.2f GB/s, ratio %.3f\n", Median(io_w) / 1e9,
         Median(sout) / 1e9, Median(out_ratio));
  return 0;
}

}  // namespace

void RegisterBenchSwap(CLI::App& bench, int* exit_code) {
  auto a = std::make_shared<SwapArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "swap", "Swap-in/swap-out throughput through the parameter swapper vs the engine's "
              "sequential read/write of the same file");
  cmd->add_option("--dir", a->dir, "NVMe directory (default $ZTIER_NVME_PATH or ./ztier_nvme)");
  cmd->add_option("--backend", a->backend, "io backend: auto, io_uring, libaio, psync");
  cmd->add_option("--partitions", a->partitions, "Partitions to swap")->check(CLI::Range(1u, 1u << 20));
  cmd->add_option("--partition-size", a->partition_size, "Bytes per partition (e.g. 16MiB)");
  cmd->add_option("--bs", a->bs, "Block size (bytes per request)");
  cmd->add_option("--qd", a->qd, "Queue depth")->check(CLI::Range(1u, 4096u));
  cmd->add_option("--buffers", a->buffers, "Swap buffers")->check(CLI::Range(1u, 65536u));
  cmd->add_option("--buffer-size", a->buffer_size, "Bytes per swap buffer");
  cmd->add_option("--runs", a->runs, "Runs (the median is reported)")->check(CLI::Range(1u, 100u));
  cmd->add_flag("--no-checksum", a->no_checksum, "Skip CRC32C per partition");
  cmd->add_flag("--json", a->json, "Print one JSON object");
  cmd->callback([a, exit_code] { *exit_code = RunBenchSwap(*a); });
}

}  // namespace ztier::cli
