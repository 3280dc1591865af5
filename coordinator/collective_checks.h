// Argument checks shared by the collective backends (local and NCCL), so
// that both reject the same buffers with the same message. Internal to
// coordinator/.
#pragma once

#include <cstdint>

#include "base/status.h"

namespace ztier::coordinator {

// `part` (part_bytes) and `full` (world x part_bytes) must be apart, or `part`
// must be exactly rank r's slot of `full` (in place, NCCL's rule); anything in
// between would overwrite input while it is still being read.
Status CheckCollectiveBuffers(const char* op, const void* part, const void* full,
                              uint64_t part_bytes, uint32_t rank, uint32_t world);

}  // namespace ztier::coordinator
