// What the collective backends share (internal to coordinator/): argument
// checks, so that every backend rejects the same buffers with the same
// message, and the host-side mean of a reduce-scatter, so that the local and
// gloo backends give bit-identical results.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "coordinator/collective.h"

namespace ztier::coordinator {

// `part` (part_bytes) and `full` (world x part_bytes) must be apart, or `part`
// must be exactly rank r's slot of `full` (in place, NCCL's rule); anything in
// between would overwrite input while it is still being read.
Status CheckCollectiveBuffers(const char* op, const void* part, const void* full,
                              uint64_t part_bytes, uint32_t rank, uint32_t world);

// ReduceScatterMean's dtype must be a floating-point one.
Status CheckMeanDType(DType dtype);

// part_elems x the dtype's size, checked for overflow.
Result<uint64_t> MeanBytes(DType dtype, uint64_t part_elems);

// dst[i] = mean over r of srcs[r][i], i < elems: summed in rank order in
// float32 and divided by the number of ranks (so every backend rounds the
// same way). dst may be one of the sources.
void MeanOfRanks(DType dtype, const std::vector<const uint8_t*>& srcs, uint8_t* dst,
                 uint64_t elems);

}  // namespace ztier::coordinator
