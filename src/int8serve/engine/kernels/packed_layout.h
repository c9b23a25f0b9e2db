// Where a packed int8 weight keeps its bytes and its scales (gemv.cpp packs and multiplies it in decode, matmul.cpp
// multiplies it in prefill on AMX; kernels/packed.py packs it in torch where the library is not built).
//
// A tile of 64 output rows is, weight group by weight group, the `span` activation groups of the weight group (2048
// bytes each: [block 4][step 8][row 16][byte 4], see gemv.cpp) followed by that weight group's 64 bf16 scales (128
// bytes, one per row):
//
//   packed[tile][weight group][ span x 2048 bytes of weights | 128 bytes of scales ]
//
// span = group_size / 32 (group_size 0: one scale per row, span = every group of the row); the last weight group of
// a row whose K does not fill it keeps the room of `span` groups, unused. The scales sit in the stream of weight
// bytes that decode reads in order. Read from an array of their own they were a second stream, which cost more than
// their bytes: on a Sapphire Rapids (2 threads, precise, weights streamed from memory, 2026-12-02), vnni512 reading
// each block's scales from the block's own cache lines instead (a timing build, wrong results) streamed the 7B decode
// shapes 1.12-1.24x faster at 1 and 2 rows; with the scales in the stream (6% more bytes in it) a batch-1 decode step
// of 8 layers of the 7B shape took 66-69 ms against 71-72 before, 4 sequences 84-86 against 86-88 (same run).

#pragma once

#include <cstdint>

namespace packed {

constexpr int64_t kGroup = 32;                        // input values a group (one activation scale)
constexpr int64_t kBlockRows = 16;                    // output rows a block (one 64-byte load: 4 inputs of each)
constexpr int64_t kBlocks = 4;                        // blocks a tile
constexpr int64_t kTileRows = kBlockRows * kBlocks;   // output rows a tile: 64
constexpr int64_t kSteps = kGroup / 4;                // 64-byte steps a block and group: 8
constexpr int64_t kBlockBytes = kBlockRows * kGroup;  // one block of a group: 512
constexpr int64_t kGroupBytes = kTileRows * kGroup;   // one group of a tile: 2048
constexpr int64_t kScaleBytes = 2 * kTileRows;        // one weight group's bf16 scales of a tile: 128

struct Layout {
  int64_t span;     // activation groups per weight group
  int64_t wgroups;  // weight groups per row

  int64_t wgroup_bytes() const { return span * kGroupBytes + kScaleBytes; }
  int64_t tile_bytes() const { return wgroups * wgroup_bytes(); }
  const uint8_t* tile(const uint8_t* packed, int64_t t) const { return packed + t * tile_bytes(); }
  // the 2048 bytes of activation group g of a tile
  const uint8_t* group(const uint8_t* tile, int64_t g) const {
    if (span == 1) return tile + g * (kGroupBytes + kScaleBytes);  // the default scheme: no division
    return tile + (g / span) * wgroup_bytes() + (g % span) * kGroupBytes;
  }
  // the 64 bf16 scales of weight group wg of a tile
  const uint16_t* scales(const uint8_t* tile, int64_t wg) const {
    return reinterpret_cast<const uint16_t*>(tile + wg * wgroup_bytes() + span * kGroupBytes);
  }
};

// groups: K / 32 rounded up; group_size: a multiple of 32, or 0 for one scale per row.
inline Layout layout(int64_t groups, int64_t group_size) {
  const int64_t span = group_size == 0 ? groups : group_size / kGroup;
  return Layout{span, (groups + span - 1) / span};
}

}  // namespace packed
