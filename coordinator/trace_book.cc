#include "coordinator/trace_book.h"

#include <algorithm>

namespace ztier::coordinator {

namespace {
// Where `module` is, or would go, among candidates sorted by module.
template <typename Candidates>
auto LowerCandidate(Candidates& candidates, uint32_t module) {
  return std::lower_bound(candidates.begin(), candidates.end(), module,
                          [](const auto& c, uint32_t m) { return c.module < m; });
}
}  // namespace

bool TraceBook::Accepts(const Slot& slot, uint32_t module) {
  if (!slot.choice()) return slot.module == module;
  auto it = LowerCandidate(slot.candidates, module);
  return it != slot.candidates.end() && it->module == module;
}

uint32_t TraceBook::MostFrequent(const Slot& slot, double* share, uint64_t* runs) {
  if (share) *share = 1.0;
  if (runs) *runs = UINT64_MAX;
  if (!slot.choice()) return slot.module;
  const Candidate* best = &slot.candidates.front();
  uint64_t total = 0;
  for (const Candidate& c : slot.candidates) {
    total += c.count;
    if (c.count > best->count) best = &c;  // sorted by module: ties keep the lowest
  }
  if (share && total > 0) *share = static_cast<double>(best->count) / static_cast<double>(total);
  if (runs) *runs = best->count;
  return best->module;
}

bool TraceBook::AcceptsPrefix(const Order& order, std::span<const uint32_t> prefix) {
  if (prefix.size() > order.slots.size()) return false;
  for (size_t k = 0; k < prefix.size(); ++k) {
    if (!Accepts(order.slots[k], prefix[k])) return false;
  }
  return true;
}

const TraceBook::Order* TraceBook::Find(uint32_t id) const {
  for (const Order& o : orders_) {
    if (o.id == id) return &o;
  }
  return nullptr;
}

const TraceBook::Order* TraceBook::MostRecent() const {
  const Order* best = nullptr;
  for (const Order& o : orders_) {
    if (best == nullptr || o.last_step > best->last_step) best = &o;
  }
  return best;
}

const TraceBook::Order* TraceBook::MostFollowed() const {
  const Order* best = nullptr;
  for (const Order& o : orders_) {
    if (best == nullptr || o.steps > best->steps) best = &o;
  }
  return best;
}

bool TraceBook::Mergeable(const Order& order, std::span<const uint32_t> sequence) const {
  if (order.slots.size() != sequence.size()) return false;
  size_t differ = 0;
  const size_t limit = sequence.size() * 3 / 4;
  for (size_t k = 0; k < sequence.size(); ++k) {
    if (!Accepts(order.slots[k], sequence[k]) && ++differ > limit) return false;
  }
  return true;
}

bool TraceBook::Merge(Order& order, std::span<const uint32_t> seq) {
  bool changed = false;
  std::vector<Slot>& slots = order.slots;
  // 1. Mirrors that this step breaks.
  for (size_t j = 0; j < slots.size(); ++j) {
    Slot& s = slots[j];
    if (s.choice() && s.mirror >= 0 && seq[j] != seq[static_cast<size_t>(s.mirror)]) {
      s.mirror = -1;  // for good: only a slot turning into a choice gets a mirror
      changed = true;
    }
  }
  // 2. Fixed slots that differ become choices. Until now slot j always ran
  //    slots[j].module: an earlier slot i mirrors it only if it was fixed
  //    with the same module and agrees with it in this step too.
  std::vector<size_t> fresh;
  for (size_t j = 0; j < slots.size(); ++j) {
    if (!slots[j].choice() && slots[j].module != seq[j]) fresh.push_back(j);
  }
  for (size_t j : fresh) {
    Slot& s = slots[j];
    for (size_t i = j; i-- > 0;) {
      const Slot& e = slots[i];
      // Fresh slots get their candidates below, so they still read as fixed.
      if (!e.choice() && e.module == s.module && seq[i] == seq[j]) {
        s.mirror = static_cast<int64_t>(i);
        break;
      }
    }
    changed = true;
  }
  for (size_t j : fresh) {
    Slot& s = slots[j];
    s.candidates.push_back({s.module, order.steps});
  }
  // 3. Count this step's module at every choice slot.
  for (size_t j = 0; j < slots.size(); ++j) {
    Slot& s = slots[j];
    if (!s.choice()) continue;
    auto it = LowerCandidate(s.candidates, seq[j]);
    if (it != s.candidates.end() && it->module == seq[j]) {
      ++it->count;
    } else {
      s.candidates.insert(it, {seq[j], 1});
      changed = true;
    }
  }
  return changed;
}

TraceBook::LearnResult TraceBook::Learn(std::span<const uint32_t> sequence, uint64_t step) {
  LearnResult r;
  if (sequence.empty()) return r;
  if (merge_) {
    // The same sequence again, or one to merge: the most recent such order.
    Order* target = nullptr;
    for (Order& o : orders_) {
      if (Mergeable(o, sequence) && (target == nullptr || o.last_step > target->last_step)) {
        target = &o;
      }
    }
    if (target != nullptr) {
      r.changed = Merge(*target, sequence);
      ++target->steps;
      target->last_step = step;
      r.order_id = target->id;
      return r;
    }
  } else {
    orders_.clear();
  }
  if (orders_.size() >= max_orders_) {
    auto oldest = std::min_element(orders_.begin(), orders_.end(),
                                   [](const Order& a, const Order& b) {
                                     return a.last_step < b.last_step;
                                   });
    orders_.erase(oldest);
  }
  Order o;
  o.id = next_id_++;
  o.slots.reserve(sequence.size());
  for (uint32_t m : sequence) o.slots.push_back(Slot{.module = m});
  o.steps = 1;
  o.last_step = step;
  orders_.push_back(std::move(o));
  r.order_id = orders_.back().id;
  r.created = true;
  r.changed = true;
  return r;
}

}  // namespace ztier::coordinator
