// CPU ISA levels: every CPU kernel is built for each vector ISA level and the best one this CPU
// runs is picked at import, as PyTorch does with its CPU_CAPABILITY builds.
//
// How. setup.py compiles every csrc/cpu/*.cpp once per level (CPU_LEVELS there: default, avx2,
// avx512, avx512_bf16, amx_bf16) into its own shared library, llama_ext/_cpu_<level>.so, with that level's
// -m flags and CPU_CAPABILITY macros. At import, llama_ext/_cpu_kernels.py asks csrc/module.cpp
// which levels the CPU runs and loads the best library (or the one LLAMA_EXT_CPU_CAPABILITY
// names); loading it runs its TORCH_LIBRARY_IMPL registrations. One library per level, rather
// than one namespace per level in one library, because the kernels also instantiate inline
// functions and templates of ATen, c10 and the standard library outside any level namespace:
// in one library the linker would keep one copy of each, compiled for whichever level it met
// first, and a lower level could run AVX-512 code. Separate libraries with hidden symbols
// cannot share a copy. at::vec still puts its code in a namespace named by CPU_CAPABILITY.
//
// The convention for a kernel file csrc/cpu/<name>.cpp (nothing else needs editing to add one):
//  - register its kernels with TORCH_LIBRARY_IMPL(llama_ext, CPU, m) as usual: each library
//    registers them once, and only one library is ever loaded;
//  - choose ISA-specific paths at compile time with the macros below (or at::vec, which follows
//    CPU_CAPABILITY), never by querying the CPU at run time: the level was chosen at import;
//  - keep a portable path for every op: the default level has no vector flags at all;
//  - define nothing that csrc/module.cpp, csrc/registration.cpp or the CUDA code calls.
//
// The level of this translation unit, from its compiler flags:
//   LLAMA_EXT_CPU_LEVEL "default" | "avx2" (AVX2, FMA, F16C) | "avx512" (AVX-512 F/BW/VL/DQ)
//                       | "avx512_bf16" (avx512 plus AVX512-BF16)
//                       | "amx_bf16" (avx512_bf16 plus AMX-TILE and AMX-BF16)
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
#error "CPU_CAPABILITY_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LLAMA_EXT_CPU_LEVEL "amx_bf16"
#elif defined(__AVX512BF16__)
#define LLAMA_EXT_CPU_LEVEL "avx512_bf16"
#else
#define LLAMA_EXT_CPU_LEVEL "avx512"
#endif
#elif defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "CPU_CAPABILITY_AVX2 needs -mavx2 -mfma -mf16c"
#endif
#define LLAMA_EXT_CPU_LEVEL "avx2"
#else
#define LLAMA_EXT_CPU_LEVEL "default"
#endif
