#include "base/crc32c.h"

#include <bit>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define ZTIER_CRC32C_X86 1
#endif

namespace ztier {
namespace {

// Castagnoli polynomial, bit-reflected (the crc32 instruction's polynomial).
constexpr uint32_t kPoly = 0x82F63B78u;

// ---- Portable path: slicing-by-8 --------------------------------------------
// kSlice.t[k][b] is the CRC register after feeding byte b followed by k zero
// bytes into a zero register, so eight bytes fold in with eight lookups.
struct SliceTables {
  uint32_t t[8][256];
};

constexpr SliceTables MakeSliceTables() {
  SliceTables r{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
    r.t[0][i] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t i = 0; i < 256; ++i) {
      const uint32_t prev = r.t[k - 1][i];
      r.t[k][i] = (prev >> 8) ^ r.t[0][prev & 0xFFu];
    }
  }
  return r;
}

constexpr SliceTables kSlice = MakeSliceTables();

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Raw register update (no pre/post inversion).
uint32_t TableUpdate(uint32_t state, const uint8_t* p, size_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    while (n >= 8) {
      const uint64_t word = Load64(p) ^ state;
      // Two independent halves: a shorter dependency chain than one long xor.
      const uint32_t lo =
          kSlice.t[7][word & 0xFF] ^ kSlice.t[6][(word >> 8) & 0xFF] ^
          kSlice.t[5][(word >> 16) & 0xFF] ^ kSlice.t[4][(word >> 24) & 0xFF];
      const uint32_t hi =
          kSlice.t[3][(word >> 32) & 0xFF] ^ kSlice.t[2][(word >> 40) & 0xFF] ^
          kSlice.t[1][(word >> 48) & 0xFF] ^ kSlice.t[0][word >> 56];
      state = lo ^ hi;
      p += 8;
      n -= 8;
    }
  }
  while (n > 0) {
    state = (state >> 8) ^ kSlice.t[0][(state ^ *p) & 0xFFu];
    ++p;
    --n;
  }
  return state;
}

#if defined(ZTIER_CRC32C_X86)
// ---- Hardware path: three interleaved streams -------------------------------
// The crc32 instruction has a latency of about 3 cycles and a throughput of
// one per cycle, so one dependent chain runs at a third of the possible speed.
// We split a chunk into three blocks of kBlock bytes, run three independent
// chains (the 2nd and 3rd from a zero register) and stitch them together:
// because the register update is linear, crc(A||B) = Z(crc(A)) ^ crc0(B),
// where Z advances a register over |B| zero bytes. Z is a 32x32 matrix over
// GF(2); we apply it with four 256-entry tables built at compile time.

// A 32x32 GF(2) matrix stored by columns: col[i] is the image of bit i.
struct Gf2Matrix {
  uint32_t col[32];
};

constexpr uint32_t Apply(const Gf2Matrix& m, uint32_t v) {
  uint32_t r = 0;
  for (int i = 0; v != 0; ++i, v >>= 1) {
    if (v & 1u) r ^= m.col[i];
  }
  return r;
}

constexpr Gf2Matrix Compose(const Gf2Matrix& a,
                            const Gf2Matrix& b) {  // a after b
  Gf2Matrix r{};
  for (int i = 0; i < 32; ++i) r.col[i] = Apply(a, b.col[i]);
  return r;
}

// The register map for feeding `bytes` zero bytes.
constexpr Gf2Matrix ZeroBytesOperator(uint64_t bytes) {
  Gf2Matrix one_bit{};
  one_bit.col[0] = kPoly;
  for (int i = 1; i < 32; ++i) one_bit.col[i] = 1u << (i - 1);
  Gf2Matrix result{};
  for (int i = 0; i < 32; ++i) result.col[i] = 1u << i;
  Gf2Matrix power = one_bit;
  for (uint64_t e = bytes * 8; e != 0; e >>= 1) {
    if (e & 1u) result = Compose(power, result);
    power = Compose(power, power);
  }
  return result;
}

struct ShiftTables {
  uint32_t t[4][256];
};

constexpr ShiftTables MakeShiftTables(uint64_t bytes) {
  const Gf2Matrix m = ZeroBytesOperator(bytes);
  ShiftTables s{};
  for (int k = 0; k < 4; ++k) {
    for (uint32_t i = 0; i < 256; ++i) s.t[k][i] = Apply(m, i << (8 * k));
  }
  return s;
}

inline uint32_t Shift(const ShiftTables& s, uint32_t crc) {
  return s.t[0][crc & 0xFF] ^ s.t[1][(crc >> 8) & 0xFF] ^
         s.t[2][(crc >> 16) & 0xFF] ^ s.t[3][crc >> 24];
}

// Block sizes in bytes (multiples of 8). The long one keeps the stitching
// cost (8 lookups per 3 blocks) negligible on large buffers; the short one
// keeps tails of a few KiB fast too.
constexpr size_t kLongBlock = 8192;
constexpr size_t kShortBlock = 256;
constexpr ShiftTables kShiftLong = MakeShiftTables(kLongBlock);
constexpr ShiftTables kShiftShort = MakeShiftTables(kShortBlock);

template <size_t kBlock>
__attribute__((target("sse4.2"))) inline uint32_t HwTriple(
    uint32_t state, const ShiftTables& shift, const uint8_t*& p, size_t& n) {
  while (n >= 3 * kBlock) {
    uint64_t c0 = state, c1 = 0, c2 = 0;
    const uint8_t* a = p;
    const uint8_t* b = p + kBlock;
    const uint8_t* c = p + 2 * kBlock;
    for (size_t i = 0; i < kBlock; i += 8) {
      c0 = _mm_crc32_u64(c0, Load64(a + i));
      c1 = _mm_crc32_u64(c1, Load64(b + i));
      c2 = _mm_crc32_u64(c2, Load64(c + i));
    }
    state = Shift(shift, Shift(shift, static_cast<uint32_t>(c0)) ^
                             static_cast<uint32_t>(c1)) ^
            static_cast<uint32_t>(c2);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return state;
}

__attribute__((target("sse4.2"))) uint32_t HwUpdate(uint32_t state,
                                                    const uint8_t* p,
                                                    size_t n) {
  // Align the 8-byte loads (unaligned ones work but can split cache lines).
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    state = _mm_crc32_u8(state, *p);
    ++p;
    --n;
  }
  state = HwTriple<kLongBlock>(state, kShiftLong, p, n);
  state = HwTriple<kShortBlock>(state, kShiftShort, p, n);
  uint64_t s = state;
  while (n >= 8) {
    s = _mm_crc32_u64(s, Load64(p));
    p += 8;
    n -= 8;
  }
  state = static_cast<uint32_t>(s);
  while (n > 0) {
    state = _mm_crc32_u8(state, *p);
    ++p;
    --n;
  }
  return state;
}

bool DetectHardware() { return __builtin_cpu_supports("sse4.2"); }
#endif  // ZTIER_CRC32C_X86

// Evaluated once, thread-safely (function-local static).
bool HardwareAvailableCached() {
#if defined(ZTIER_CRC32C_X86)
  static const bool available = DetectHardware();
  return available;
#else
  return false;
#endif
}

}  // namespace

uint32_t Crc32cPortable(const void* data, size_t bytes, uint32_t crc) {
  return ~TableUpdate(~crc, static_cast<const uint8_t*>(data), bytes);
}

uint32_t Crc32cHardware(const void* data, size_t bytes, uint32_t crc) {
#if defined(ZTIER_CRC32C_X86)
  return ~HwUpdate(~crc, static_cast<const uint8_t*>(data), bytes);
#else
  return Crc32cPortable(data, bytes, crc);
#endif
}

bool Crc32cHardwareAvailable() { return HardwareAvailableCached(); }

std::string_view Crc32cImplementation() {
  return HardwareAvailableCached() ? "sse4.2" : "table";
}

uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc) {
  if (bytes == 0) return crc;
  return HardwareAvailableCached() ? Crc32cHardware(data, bytes, crc)
                                   : Crc32cPortable(data, bytes, crc);
}

}  // namespace ztier
