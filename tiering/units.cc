#include "tiering/units.h"

#include <cstdio>
#include <optional>

namespace ztier::tiering {
namespace {

using u128 = unsigned __int128;

// 10^38 < 2^128 / 2: a mantissa of up to 37 significant digits times a small
// multiplier cannot wrap.
constexpr int kMaxDigits = 37;

struct UnitDef {
  std::string_view name;
  uint64_t bytes;
};

// Binary units first: FormatByteSize picks from the end of this prefix.
constexpr UnitDef kUnits[] = {
    {"B", 1},
    {"KiB", 1ULL << 10},
    {"MiB", 1ULL << 20},
    {"GiB", 1ULL << 30},
    {"TiB", 1ULL << 40},
    {"KB", 1'000ULL},
    {"MB", 1'000'000ULL},
    {"GB", 1'000'000'000ULL},
    {"TB", 1'000'000'000'000ULL},
    // Single letters are binary, as dd, fio and the coreutils read them
    // ("--bs 4k" is 4096 bytes); the two-letter forms above are SI.
    {"K", 1ULL << 10},
    {"M", 1ULL << 20},
    {"G", 1ULL << 30},
    {"T", 1ULL << 40},
};
constexpr int kBinaryUnits = 5;

// A decimal number as written: sign, significant digits and a power of ten.
struct Decimal {
  bool negative = false;
  u128 digits = 0;  // without leading or trailing zeros
  int scale = 0;    // value = digits * 10^scale
  bool too_many_digits = false;
};

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

char Lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

// Unit names match in any letter case: "kib", "KIB" and "KiB" are one unit,
// while "KB" (1000) and "KiB" (1024) stay apart by their spelling.
bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (Lower(a[i]) != Lower(b[i])) return false;
  }
  return true;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
    s.remove_suffix(1);
  return s;
}

// Parses the longest number at the start of `s`: [+-] digits [. digits]
// [e [+-] digits], with '_' allowed between digits. Returns the characters
// consumed, or nullopt when `s` does not start with a number.
std::optional<size_t> ParseDecimal(std::string_view s, Decimal* out) {
  size_t i = 0;
  Decimal d;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) {
    d.negative = s[i] == '-';
    ++i;
  }
  int significant = 0;
  int pending_zeros = 0;  // zeros not yet multiplied in (maybe trailing)
  int frac_digits = 0;
  bool any_digit = false;
  auto add_digit = [&](char c, bool fraction) {
    any_digit = true;
    if (fraction) ++frac_digits;
    if (c == '0') {
      if (significant > 0) ++pending_zeros;
      return;
    }
    // Flush the zeros held back: they were not trailing after all.
    for (int z = 0; z <= pending_zeros; ++z) {
      if (significant >= kMaxDigits) {
        d.too_many_digits = true;
        return;
      }
      d.digits *= 10;
      ++significant;
    }
    pending_zeros = 0;
    d.digits += static_cast<unsigned>(c - '0');
  };
  // Digit runs with '_' separators: an '_' must sit between two digits.
  auto digit_run = [&](bool fraction) {
    size_t start = i;
    while (i < s.size()) {
      if (IsDigit(s[i])) {
        add_digit(s[i], fraction);
        ++i;
      } else if (s[i] == '_' && i > start && i + 1 < s.size() &&
                 IsDigit(s[i + 1])) {
        ++i;
      } else {
        break;
      }
    }
    return i > start;
  };
  digit_run(false);
  if (i < s.size() && s[i] == '.') {
    ++i;
    digit_run(true);
  }
  if (!any_digit) return std::nullopt;
  int exponent = 0;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    size_t j = i + 1;
    bool exp_negative = false;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) {
      exp_negative = s[j] == '-';
      ++j;
    }
    if (j < s.size() && IsDigit(s[j])) {
      while (j < s.size() && IsDigit(s[j])) {
        if (exponent < 100000) exponent = exponent * 10 + (s[j] - '0');
        ++j;
      }
      if (exp_negative) exponent = -exponent;
      i = j;
    }
    // "1e" or "1eB": not an exponent; the caller sees the rest as a unit.
  }
  d.scale = pending_zeros + exponent - frac_digits;
  if (d.digits == 0) d.scale = 0;
  *out = d;
  return i;
}

// digits * 10^scale * multiplier as an exact whole number. Returns nullopt
// when it is not whole; sets *overflow when it does not fit in 64 bits.
std::optional<u128> Evaluate(const Decimal& d, uint64_t multiplier,
                             bool* overflow) {
  *overflow = false;
  if (d.digits == 0) return 0;
  if (d.too_many_digits) {
    *overflow = true;
    return std::nullopt;
  }
  u128 v = d.digits;
  if (__builtin_mul_overflow(v, static_cast<u128>(multiplier), &v)) {
    *overflow = true;
    return std::nullopt;
  }
  if (d.scale >= 0) {
    for (int k = 0; k < d.scale; ++k) {
      if (__builtin_mul_overflow(v, static_cast<u128>(10), &v) ||
          v > std::numeric_limits<uint64_t>::max()) {
        *overflow = true;
        return std::nullopt;
      }
    }
  } else {
    for (int k = 0; k < -d.scale; ++k) {
      if (v % 10 != 0) return std::nullopt;
      v /= 10;
    }
  }
  if (v > std::numeric_limits<uint64_t>::max()) {
    *overflow = true;
    return std::nullopt;
  }
  return v;
}

std::string RangeText(const Limits& l, bool bytes) {
  auto fmt = [bytes](uint64_t v) {
    return bytes ? FormatByteSize(v) : FormatElementCount(v);
  };
  std::string s = "allowed: ";
  if (l.max == std::numeric_limits<uint64_t>::max() && !l.allow_inf) {
    s += ">= " + fmt(l.min);
  } else {
    s += fmt(l.min) + " to " + fmt(l.max);
  }
  if (l.allow_inf) s += ", or inf";
  return s;
}

Status OutOfRange(std::string_view text, const Limits& l, bool bytes) {
  return Status::InvalidArgument("'" + std::string(text) +
                                 "' is out of range (" + RangeText(l, bytes) +
                                 ")");
}

// Shared tail of both parsers: range check of an exact value.
Result<uint64_t> Check(std::string_view text, const Decimal& d,
                       uint64_t multiplier, const Limits& l, bool bytes,
                       std::string_view what) {
  bool overflow = false;
  std::optional<u128> v = Evaluate(d, multiplier, &overflow);
  if (overflow || (d.negative && d.digits != 0))
    return OutOfRange(text, l, bytes);
  if (!v) {
    return Status::InvalidArgument("'" + std::string(text) +
                                   "' is not a whole number" +
                                   std::string(what));
  }
  uint64_t value = static_cast<uint64_t>(*v);
  if (value < l.min || value > l.max) return OutOfRange(text, l, bytes);
  return value;
}

}  // namespace

std::string_view ByteUnitList() {
  return "B, K or KiB, M or MiB, G or GiB, T or TiB (1024-based), KB, MB, GB, "
         "TB (1000-based), in any letter case";
}

Result<uint64_t> ParseElementCount(std::string_view raw, const Limits& limits) {
  std::string_view text = Trim(raw);
  if (text == "inf" || text == "Inf" || text == "INF" || text == ".inf" ||
      text == ".Inf" || text == ".INF") {
    if (limits.allow_inf) return kInfinite;
    return Status::InvalidArgument("'" + std::string(text) +
                                   "' is not allowed here (" +
                                   RangeText(limits, false) + ")");
  }
  Decimal d;
  std::optional<size_t> used = ParseDecimal(text, &d);
  if (!used || *used != text.size()) {
    std::string msg = "expected a whole number such as 32, 50000000 or 5e7";
    if (limits.allow_inf) msg += ", or inf";
    msg += ", got '" + std::string(text) + "'";
    if (used && *used < text.size())
      msg += " (element counts and counts take no unit)";
    return Status::InvalidArgument(std::move(msg));
  }
  return Check(text, d, 1, limits, false, "");
}

Result<uint64_t> ParseByteSize(std::string_view raw, const Limits& limits) {
  std::string_view text = Trim(raw);
  Decimal d;
  std::optional<size_t> used = ParseDecimal(text, &d);
  if (!used) {
    return Status::InvalidArgument(
        "expected a byte size such as 4096, 256KiB or 1MiB, got '" +
        std::string(text) + "'");
  }
  std::string_view unit = Trim(text.substr(*used));
  uint64_t multiplier = 1;
  if (!unit.empty()) {
    bool found = false;
    for (const UnitDef& u : kUnits) {
      if (EqualsIgnoreCase(u.name, unit)) {
        multiplier = u.bytes;
        found = true;
        break;
      }
    }
    if (!found) {
      return Status::InvalidArgument(
          "unknown unit '" + std::string(unit) + "' in '" + std::string(text) +
          "' (valid units: " + std::string(ByteUnitList()) + ")");
    }
  }
  return Check(text, d, multiplier, limits, true, " of bytes");
}

std::string FormatElementCount(uint64_t n) {
  if (n == kInfinite) return "inf";
  if (n == 0) return "0";
  int zeros = 0;
  uint64_t m = n;
  while (m % 10 == 0) {
    m /= 10;
    ++zeros;
  }
  if (zeros < 4) return std::to_string(n);
  // m has no trailing zeros: n = m * 10^zeros. Write m as d.ddd and adjust
  // the exponent by its digit count.
  std::string digits = std::to_string(m);
  int exponent = zeros + static_cast<int>(digits.size()) - 1;
  std::string s = digits.substr(0, 1);
  if (digits.size() > 1) s += "." + digits.substr(1);
  return s + "e" + std::to_string(exponent);
}

std::string FormatByteSize(uint64_t bytes) {
  if (bytes == 0) return "0";
  for (int k = kBinaryUnits - 1; k >= 1; --k) {
    if (bytes % kUnits[k].bytes == 0) {
      return std::to_string(bytes / kUnits[k].bytes) +
             std::string(kUnits[k].name);
    }
  }
  return std::to_string(bytes);
}

std::string HumanBytes(uint64_t bytes) {
  int k = 0;
  while (k + 1 < kBinaryUnits && bytes >= kUnits[k + 1].bytes) ++k;
  if (k == 0) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes) / static_cast<double>(kUnits[k].bytes);
  char buf[32];
  if (bytes % kUnits[k].bytes == 0) {
    snprintf(buf, sizeof(buf), "%llu %s",
             static_cast<unsigned long long>(bytes / kUnits[k].bytes),
             std::string(kUnits[k].name).c_str());
  } else {
    snprintf(buf, sizeof(buf), "%.1f %s", v,
             std::string(kUnits[k].name).c_str());
  }
  return buf;
}

}  // namespace ztier::tiering
