// The Python module llama_ext._C. Importing it only has to load this library so that the
// operator registrations (csrc/registration.cpp, TORCH_LIBRARY_IMPL in the backends) run; the
// module itself is empty (no pybind11, every entry point is a torch op). Its one job is to
// refuse, naming the feature, on a CPU that lacks the vector ISA the CPU kernels were built for.
#include <Python.h>

namespace {

// The CPU kernels are compiled for the build host's vector ISA (setup.py). On a CPU without
// it the first op would die of SIGILL; the import names the missing feature instead.
const char* missing_cpu_feature() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#if defined(CPU_CAPABILITY_AVX512)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
    return "AVX-512 (F, BW, VL, DQ)";
  }
#endif
#if defined(__AVX512BF16__)
  if (!__builtin_cpu_supports("avx512bf16")) return "AVX512-BF16";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    return "AVX2, FMA and F16C";
  }
#endif
#endif
  return nullptr;
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  if (const char* feature = missing_cpu_feature()) {
    PyErr_Format(PyExc_ImportError,
                 "llama_ext was built for CPUs with %s, which this CPU lacks. Rebuild it on this machine "
                 "(pip install --no-build-isolation --force-reinstall .), or build with LLAMA_EXT_CPU_VEC=avx2 "
                 "(or none) for older CPUs.",
                 feature);
    return nullptr;
  }
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
