// A checkpoint data file, written once front to back and read in checked
// chunks.
//
// ShardWriter: Append() copies into one of a few aligned buffers; two
// background threads write full buffers (O_DIRECT where the filesystem takes
// it, so a save does not fill the page cache) while the caller fills the
// next one, and compute a CRC32C per chunk of the file. Finish() writes the
// tail, cuts the file to its logical size and fsyncs it. Memory: `buffers`
// x `buffer_bytes`.
//
// ShardReader: Read(offset, bytes) reads the whole chunks covering the range
// (a window of several chunks at a time, the next window read ahead on a
// helper thread), checks each against its CRC32C once, and copies the range
// out. Memory: two 16 MiB windows. A mismatch is Corruption naming the file,
// the chunk and its byte range.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "checkpoint/fs.h"

namespace ztier::checkpoint {

class ShardWriter {
 public:
  // `buffer_bytes` must be a positive multiple of `chunk_bytes` (at most 64
  // chunks), itself a multiple of 4096.
  static Result<std::unique_ptr<ShardWriter>> Create(Fs& fs, const std::string& path,
                                                     uint64_t chunk_bytes,
                                                     uint64_t buffer_bytes = 16ull << 20,
                                                     uint32_t buffers = 4);
  ~ShardWriter();  // stops the thread; an unfinished file is left for the caller to remove

  // Reserves the file's expected size before the first Append: writes into
  // a reserved file run side by side (an append past the end of a file is
  // serialised by the filesystem). Finish cuts what is not used.
  Status Reserve(uint64_t bytes);
  // Appends `bytes` at offset(); the first write error is returned by this
  // or a later call.
  Status Append(const void* data, uint64_t bytes);
  uint64_t offset() const { return offset_; }
  // Writes what is left, truncates to offset(), fsyncs and closes.
  Status Finish();
  const std::vector<uint32_t>& chunk_crcs() const { return crcs_; }

 private:
  struct Buffer {
    uint8_t* data = nullptr;
    uint64_t file_offset = 0;
    uint64_t bytes = 0;
  };
  ShardWriter(Fs& fs, std::string path, uint64_t chunk_bytes, uint64_t buffer_bytes);
  void Loop();
  Status Submit();  // queues the current buffer and takes a free one
  Status Error();

  Fs& fs_;
  std::string path_;
  int fd_ = -1;
  bool direct_ = false;
  uint64_t chunk_bytes_, buffer_bytes_;
  uint64_t offset_ = 0;
  std::vector<uint32_t> crcs_;  // per chunk, filled by the writer threads (mu_)
  std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> storage_;
  Buffer current_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Buffer> queue_, free_;
  Status error_;
  bool stop_ = false;
  uint32_t in_flight_ = 0;  // buffers being written
  std::vector<std::thread> threads_;
};

class ShardReader {
 public:
  // `crcs` covers `data_bytes` in `chunk_bytes` chunks (the shard index).
  static Result<std::unique_ptr<ShardReader>> Open(const std::string& path, uint64_t data_bytes,
                                                   uint64_t chunk_bytes,
                                                   std::vector<uint32_t> crcs);
  ~ShardReader();
  // Copies bytes [offset, offset + bytes) into `out`, every chunk checked.
  Status Read(uint64_t offset, uint64_t bytes, void* out);
  // Reads and checks every chunk (verify).
  Status CheckAll();

 private:
  ShardReader() = default;
  // Makes the window start at chunk `k` (from the read-ahead when it
  // guessed right), then reads the next window ahead.
  Status Load(uint64_t k);
  // Reads and checks the window at chunk `k` into `buf`.
  Status LoadInto(uint64_t k, uint8_t* buf, uint64_t* chunks_loaded) const;

  std::string path_;
  int fd_ = -1;
  bool direct_ = false;
  uint64_t data_bytes_ = 0, chunk_bytes_ = 0;
  std::vector<uint32_t> crcs_;
  std::unique_ptr<uint8_t, void (*)(void*)> window_{nullptr, free};
  std::unique_ptr<uint8_t, void (*)(void*)> spare_{nullptr, free};  // the read-ahead's
  std::future<Status> ahead_;
  uint64_t ahead_first_ = 0, ahead_chunks_ = 0;
  uint64_t window_chunks_ = 0;
  uint64_t first_ = UINT64_MAX;  // first chunk in the window
  uint64_t loaded_ = 0;          // chunks in the window
};

}  // namespace ztier::checkpoint
