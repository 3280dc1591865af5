// CRC32C (Castagnoli): the checksum ztier stores beside each partition on
// NVMe and checks after every read, so that a torn or misplaced block is
// reported as corruption instead of silently training on garbage.
//
// Crc32c() uses the SSE4.2 crc32 instruction when the CPU has it (three
// independent streams interleaved, so the instruction's 3-cycle latency is
// hidden) and a portable slicing-by-8 table otherwise; both give the same
// value. The value is the standard one (reflected polynomial 0x82F63B78,
// initial value and final xor 0xFFFFFFFF): Crc32c("123456789", 9) ==
// 0xE3069283, the value iSCSI, ext4 and SCTP use.
//
// It is extendable: Crc32c(b, nb, Crc32c(a, na)) == Crc32c(a||b, na + nb), so
// a buffer can be checksummed piece by piece as its I/O completes.
//
// Thread-safety: pure functions; call from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ztier {

// CRC32C of `bytes` bytes at `data`, continuing from `crc` (the value
// returned for the bytes before; 0 to start).
uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc = 0);

// The two implementations behind Crc32c(), exposed for tests and benchmarks.
// Crc32cHardware() must only be called when Crc32cHardwareAvailable().
uint32_t Crc32cPortable(const void* data, size_t bytes, uint32_t crc = 0);
uint32_t Crc32cHardware(const void* data, size_t bytes, uint32_t crc = 0);

// True when this build and this CPU support the SSE4.2 path.
bool Crc32cHardwareAvailable();
// "sse4.2" or "table": which path Crc32c() takes here.
std::string_view Crc32cImplementation();

}  // namespace ztier
