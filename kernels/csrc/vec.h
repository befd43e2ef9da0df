// Shared by the native ops: pick at::vec's SIMD implementation, then include ATen's vector, dispatch and
// parallel headers. CMakeLists.txt compiles the ops once per capability with CPU_CAPABILITY=<X> and
// CPU_CAPABILITY_<X> set explicitly (DEFAULT: no ISA flags; AVX2: -mavx2 -mfma -mf16c; AVX512: -mavx512f/bw/vl/dq
// -mfma), as torch builds its own per-capability kernels; adaswitch/_backend.py loads the widest one the CPU
// supports. Without CPU_CAPABILITY (a hand-made build) it follows what the compiler targets.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif
#endif

// A capability whose instructions the compiler may not emit would not build (or, worse, mix ISAs).
#if defined(CPU_CAPABILITY_AVX512) && \
    !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__))
#error "CPU_CAPABILITY_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#if defined(CPU_CAPABILITY_AVX2) && !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "CPU_CAPABILITY_AVX2 needs -mavx2 -mfma -mf16c"
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
