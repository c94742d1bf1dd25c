// The kernel of attention_pairs_kernel.h compiled for x86-64-v4 (AVX-512); attention_pairs.cpp calls it on
// processors that support it. Empty where GCC does not target x86-64.
#include "cpu/attention_pairs.h"

#if KOBATTR_X86_ISAS
#define KOBATTR_ISA x86_64_v4
#define KOBATTR_ISA_PRAGMA "GCC target(\"arch=x86-64-v4\")"
#include "cpu/attention_pairs_kernel.h"
#endif
