// Shared multi-tensor table constants exposed to the host (fastclu._C.CHUNK / ROW_HEADER).
#include "common.cuh"
#include "ops.h"

namespace fastclu {

int64_t chunk_elements() { return kChunk; }
int row_header() { return kRowHeader; }

}  // namespace fastclu
