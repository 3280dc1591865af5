// Units: parsing and printing the two kinds of quantity a ztier config holds.
//
//   element count  "100000000", "1e8", "5e7", "1.5e6", "100_000" and, only
//                  where a key allows it, "inf" (returned as kInfinite).
//   byte size      "4096", "1e6", "4KiB", "1MiB", "1.5GiB", "512B"; binary
//                  units KiB/MiB/GiB/TiB and their single letters K/M/G/T
//                  ("4k" = 4096), decimal units KB/MB/GB/TB ("1MB" =
//                  1000000); unit names in any letter case; an optional
//                  space may sit between number and unit. This is the one
//                  size grammar of ztier: YAML keys, command-line options
//                  and the C API's config text all read sizes through it.
//
// Numbers are parsed exactly (no floating point): "1.5e6" is 1500000, and a
// value that is not a whole number ("1.5e0", "0.1KiB") is an error, as is a
// negative one or one beyond 2^64 - 1. The error messages name what was
// expected and, for a bad unit, the valid units; the caller adds the key path.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "base/status.h"

namespace ztier::tiering {

// The value of "inf" for the element counts that accept it.
inline constexpr uint64_t kInfinite = std::numeric_limits<uint64_t>::max();

// The unit names ParseByteSize accepts, for messages: "B, KiB, ...".
std::string_view ByteUnitList();

// Element counts above this (10^15, far beyond any model) are out of range
// unless a key says otherwise; it keeps products such as buffer_count *
// buffer_size * element bytes far from overflow.
inline constexpr uint64_t kMaxElements = 1'000'000'000'000'000ULL;

// The values a key accepts. A value outside [min, max] (negative ones
// included) is an error that states this range.
struct Limits {
  uint64_t min = 0;
  uint64_t max = kMaxElements;
  bool allow_inf = false;  // "inf" -> kInfinite (element counts only)
};

// Parses an element count (or any plain whole number, e.g. a queue depth).
Result<uint64_t> ParseElementCount(std::string_view text, const Limits& limits);

// Parses a byte size: a number with an optional unit. The range in messages
// is printed with units ("4KiB to 256MiB").
Result<uint64_t> ParseByteSize(std::string_view text, const Limits& limits);

// Exact, parseable text for an element count: "1e8", "5e7", "1.5e6" when the
// value has at least four trailing zeros, else the plain integer; kInfinite
// prints as "inf". ParseElementCount(FormatElementCount(x)) == x.
std::string FormatElementCount(uint64_t n);

// Exact, parseable text for a byte size: the largest binary unit that divides
// it ("1MiB", "256KiB", "3GiB"), else the plain integer ("5000").
std::string FormatByteSize(uint64_t bytes);

// Rounded text for people: "953.7 MiB", "4 KiB", "12 B".
std::string HumanBytes(uint64_t bytes);

}  // namespace ztier::tiering
