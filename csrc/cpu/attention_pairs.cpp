// The CPU entry points (attention_pairs.h): the kernel of attention_pairs_kernel.h compiled for the x86-64
// baseline here, and for AVX2 (x86-64-v3) and AVX-512 (x86-64-v4) in attention_pairs_x86_64_v3.cpp and
// _v4.cpp where GCC targets x86-64; each call runs the widest one this processor supports, unless use_isa
// chose another.
#define KOBATTR_ISA baseline
#include "cpu/attention_pairs_kernel.h"

#include <atomic>
#include <stdexcept>
#include <string>

#include "cpu/attention_pairs.h"

namespace kobattr {

#if KOBATTR_X86_ISAS
namespace x86_64_v3 {
void attention_maps(const AttentionPairsArgs& a, int64_t num_threads);
void row_lse(const AttentionPairsArgs& a, float* lse, int64_t num_threads);
}  // namespace x86_64_v3
namespace x86_64_v4 {
void attention_maps(const AttentionPairsArgs& a, int64_t num_threads);
void row_lse(const AttentionPairsArgs& a, float* lse, int64_t num_threads);
}  // namespace x86_64_v4
#endif

namespace {

struct Isa {
    const char* name;
    void (*attention_maps)(const AttentionPairsArgs&, int64_t);
    void (*row_lse)(const AttentionPairsArgs&, float*, int64_t);
    bool (*supported)();
};

// Widest first.
const Isa kIsas[] = {
#if KOBATTR_X86_ISAS
    {"x86-64-v4", x86_64_v4::attention_maps, x86_64_v4::row_lse,
     [] { return __builtin_cpu_supports("x86-64-v4") != 0; }},
    {"x86-64-v3", x86_64_v3::attention_maps, x86_64_v3::row_lse,
     [] { return __builtin_cpu_supports("x86-64-v3") != 0; }},
#endif
    {"baseline", baseline::attention_maps, baseline::row_lse, [] { return true; }},
};

// Index into kIsas of the instruction set every call uses: the widest supported one until use_isa.
std::atomic<int> chosen{-1};

const Isa& current() {
    int index = chosen.load();
    if (index < 0) {
        index = 0;
        while (!kIsas[index].supported()) ++index;
        chosen.store(index);
    }
    return kIsas[index];
}

}  // namespace

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (const Isa& isa : kIsas)
        if (isa.supported()) names.emplace_back(isa.name);
    return names;
}

std::string current_isa() { return current().name; }

std::string use_isa(const std::string& name) {
    const std::string previous = current_isa();
    for (int index = 0; index < int(sizeof kIsas / sizeof kIsas[0]); ++index)
        if (name == kIsas[index].name) {
            if (!kIsas[index].supported())
                throw std::invalid_argument("this processor cannot run the " + name + " build of the CPU kernel.");
            chosen.store(index);
            return previous;
        }
    std::string known;
    for (const Isa& isa : kIsas) known += std::string(known.empty() ? "" : ", ") + isa.name;
    throw std::invalid_argument("unknown instruction set '" + name + "'; this build has " + known + ".");
}

std::atomic<int64_t> cache_limit{int64_t(512) << 20};

int64_t set_cache_limit(int64_t bytes) {
    if (bytes < 0) throw std::invalid_argument("the cache limit is a number of bytes, at least 0.");
    return cache_limit.exchange(bytes);
}

void attention_maps_cpu(const AttentionPairsArgs& args, int64_t num_threads) {
    AttentionPairsArgs with_cache = args;
    with_cache.cache_bytes = cache_limit.load();
    current().attention_maps(with_cache, num_threads);
}

void row_lse_cpu(const AttentionPairsArgs& args, float* lse, int64_t num_threads) {
    current().row_lse(args, lse, num_threads);
}

}  // namespace kobattr
