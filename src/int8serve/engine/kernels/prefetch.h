// Cache hints for our kernels (gemv.cpp, attention.cpp), as assembly statements.
//
// GCC 12 (-O3) can remove every call to a small helper whose only effect is _mm_prefetch, and did, silently: the
// GEMMs' hints for the next K-block (gemv.cpp, then ask_for_next_kblock) went from the library at 8fca354, when the
// helper began to find the K-block's bytes itself, and decode attention's L2 hints in its score loops (attention.cpp,
// hint_stream) were never in it (objdump showed no prefetch instruction from them; kept out of line, the helper's
// calls were gone). An asm volatile statement is never removed; its memory operand is the line asked for.
// tests/engine/test_kernel_hints.py looks for these hints in the built libraries.

#pragma once

#include <xmmintrin.h>

// Asks for the cache line holding `p` into L1 (_MM_HINT_T0) or L2 (_MM_HINT_T1).
template <int kHint>
inline void ask_for_line(const void* p) {
  static_assert(kHint == _MM_HINT_T0 || kHint == _MM_HINT_T1, "an L1 or an L2 hint");
  if constexpr (kHint == _MM_HINT_T0)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
}
