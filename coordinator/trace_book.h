// TraceBook: the module orders a coordinator has learned from earlier steps
// (docs/design.md "Dynamic traces").
//
// Every step's module sequence is learned when the step ends (Learn). A
// sequence as long as a known order that differs from it at no more than
// three quarters of the positions is merged into that order: the positions where
// steps differ become choice slots (MoE experts, branches), each with the
// modules seen there and how often. A choice slot whose module has equalled
// an earlier slot's in every step learned since it became a choice (the
// backward of a forward expert, a recomputed module) mirrors that slot: once
// the earlier slot's module is known in a step, the mirror's is too. Any
// other sequence becomes an order of its own (a forward-only generation step
// beside a training step); at most `max_orders` are kept, the one followed
// least recently dropped first.
//
// With `merge` off (the "single" trace policy, DeepSpeed's rule) the book
// keeps one order, replaced by each sequence learned.
//
// Plain data, no locking: the coordinator's lock guards it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace ztier::coordinator {

class TraceBook {
 public:
  struct Candidate {
    uint32_t module = 0;  // module index
    uint64_t count = 0;   // steps that ran it at this slot
  };
  struct Slot {
    uint32_t module = 0;               // fixed slot: its module; choice: the first seen
    std::vector<Candidate> candidates;  // empty for a fixed slot; sorted by module
    int64_t mirror = -1;               // choice slot: earlier slot it equals, or -1
    bool choice() const { return !candidates.empty(); }
  };
  struct Order {
    uint32_t id = 0;          // stable number, for the event log
    std::vector<Slot> slots;  // one per module fetch of a step
    uint64_t steps = 0;       // steps learned into it
    uint64_t last_step = 0;   // the latest of them
  };
  struct LearnResult {
    uint32_t order_id = 0;
    bool created = false;     // a new order
    bool changed = false;     // a new order, or a slot/candidate/mirror changed
  };

  TraceBook(size_t max_orders, bool merge) : max_orders_(max_orders ? max_orders : 1),
                                             merge_(merge) {}

  // Learns one step's sequence of module indices (empty: ignored, returns
  // order_id 0 with nothing changed).
  LearnResult Learn(std::span<const uint32_t> sequence, uint64_t step);

  // Whether `module` may run at `slot`: the fixed module, or a candidate.
  static bool Accepts(const Slot& slot, uint32_t module);
  // The most likely module of a choice slot with no better source: the most
  // frequent candidate (the lowest index on a tie). `share`, when given,
  // receives its share of the steps counted at the slot (1 for a fixed slot);
  // `runs` the number of those steps it ran in (UINT64_MAX for a fixed slot).
  static uint32_t MostFrequent(const Slot& slot, double* share = nullptr,
                               uint64_t* runs = nullptr);
  // Whether slots [0, prefix.size()) of `order` accept `prefix`.
  static bool AcceptsPrefix(const Order& order, std::span<const uint32_t> prefix);

  const Order* Find(uint32_t id) const;
  // The order followed most recently (null when empty).
  const Order* MostRecent() const;
  // The order with most steps learned (null when empty).
  const Order* MostFollowed() const;
  const std::vector<Order>& orders() const { return orders_; }
  size_t size() const { return orders_.size(); }
  void Clear() { orders_.clear(); }

 private:
  // True if `sequence` is close enough to `order` to merge (same length,
  // at most three quarters of the positions differ: an MoE model with few
  // dense modules between its expert layers differs at many, e.g. 16 of 24
  // when two blocks run two two-layer experts of eight, forward and back).
  bool Mergeable(const Order& order, std::span<const uint32_t> sequence) const;
  // Merges; true if anything about the order's slots changed.
  static bool Merge(Order& order, std::span<const uint32_t> sequence);

  size_t max_orders_;
  bool merge_;
  uint32_t next_id_ = 0;
  std::vector<Order> orders_;
};

}  // namespace ztier::coordinator
