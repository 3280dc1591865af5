// ExportTorch (checkpoint.h): the weights as torch's own serialization.
#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/reader.h"
#include "coordinator/collective.h"
#include "optim/element.h"

namespace ztier::checkpoint {

namespace fs = std::filesystem;
using coordinator::DType;

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


}  // namespace

Status ExportTorch(const std::string& dir, const std::string& out_path) {
  ZTIER_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> ck, CheckpointReader::Open(dir));
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
      if (eb == 4 || it.out_dtype == DType::kUInt8) {
        status = put(in.data(), in.size());  // float32 (or the master) and uint8 as they are
      } else {
        // float16 or bfloat16.
        const optim::DType t = coordinator::ElementType(p.dtype);
        conv.resize(n);
        for (uint64_t i = 0; i < n; ++i) conv[i] = optim::ElementToFloat(in.data(), i, t);
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
