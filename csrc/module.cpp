// The Python module llama_ext._C. Loading this library runs the op schemas' registration
// (csrc/registration.cpp) and the CUDA kernels' TORCH_LIBRARY_IMPL; the CPU kernels live in one
// library per vector ISA level (csrc/cpu/capability.h), of which llama_ext/_cpu_kernels.py loads
// one. This module's functions tell which levels this CPU can run and which CPU it is:
//
//   llama_ext._C.cpu_capabilities() -> ((level, missing), ...), lowest level first,
//   llama_ext._C.cpu_model() -> (vendor, family), e.g. ("AuthenticAMD", 26) for Zen 5,
//
// where missing is None when the CPU (and its OS, which must save the wider registers) runs the
// level, else the features it lacks, for the error message of a forced level; the model picks
// between kernels that are equally correct but fast on different cores (_cpu_kernels.py). It
// uses CPython's limited API only (setup.py builds abi3 libraries, with Py_LIMITED_API).
#include <Python.h>

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define LLAMA_EXT_X86 1
#include <cpuid.h>
#endif
#if defined(LLAMA_EXT_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// __builtin_cpu_supports takes string literals only, hence one function per level. The
// features are exactly those of the level's compiler flags (setup.py, CPU_LEVELS).
bool has_avx2() {
#if defined(LLAMA_EXT_X86)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(LLAMA_EXT_X86)
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if defined(LLAMA_EXT_X86)
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX needs the CPU's tile instructions and the OS's leave to use their 8 KB of register
// state: Linux grants it per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA; without it the first tile instruction faults). Asking is harmless when granted
// already (torch's oneDNN asks too) and is how the amx_bf16 level's kernels get it: this runs
// before a level is chosen. CPUID is read directly: __builtin_cpu_supports knows no AMX
// features before GCC 12.
bool has_amx_bf16() {
#if defined(LLAMA_EXT_X86) && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!has_avx512_bf16() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;  // CPUID.(7,0):EDX
  if ((edx & kAmxBf16) == 0 || (edx & kAmxTile) == 0) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool always() { return true; }

struct Level {
  const char* name;
  const char* features;  // what the level needs, for messages
  bool (*supported)();
};

constexpr Level kLevels[] = {
    {"default", "nothing", &always},
    {"avx2", "AVX2, FMA and F16C", &has_avx2},
    {"avx512", "AVX-512 F, BW, VL and DQ", &has_avx512},
    {"avx512_bf16", "AVX-512 F, BW, VL, DQ and BF16", &has_avx512_bf16},
    {"amx_bf16", "AVX-512 F, BW, VL, DQ and BF16, AMX-TILE and AMX-BF16, and Linux's leave to use AMX", &has_amx_bf16},
};

PyObject* cpu_capabilities(PyObject*, PyObject*) {
#if defined(LLAMA_EXT_X86)
  __builtin_cpu_init();
#endif
  constexpr Py_ssize_t n = sizeof(kLevels) / sizeof(kLevels[0]);
  PyObject* result = PyTuple_New(n);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Level& level = kLevels[i];
    PyObject* entry = level.supported() ? Py_BuildValue("(sO)", level.name, Py_None)
                                        : Py_BuildValue("(ss)", level.name, level.features);
    if (entry == nullptr || PyTuple_SetItem(result, i, entry) != 0) {  // SetItem takes entry, even on failure
      Py_DECREF(result);
      return nullptr;
    }
  }
  return result;
}

// CPUID leaf 0's vendor string and leaf 1's display family (the base family, plus the extended
// family where the base is 0xF, as both vendors define it); ("", 0) off x86.
PyObject* cpu_model(PyObject*, PyObject*) {
  char vendor[13] = {};
  unsigned family = 0;
#if defined(LLAMA_EXT_X86)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
    std::memcpy(vendor, &ebx, 4), std::memcpy(vendor + 4, &edx, 4), std::memcpy(vendor + 8, &ecx, 4);
  }
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
    family = (eax >> 8) & 0xF;
    if (family == 0xF) family += (eax >> 20) & 0xFF;
  }
#endif
  return Py_BuildValue("(sI)", vendor, family);
}

PyMethodDef methods[] = {
    {"cpu_capabilities", &cpu_capabilities, METH_NOARGS,
     "((level, missing), ...), lowest level first: missing is None when this CPU runs the level, else the "
     "CPU features it lacks."},
    {"cpu_model", &cpu_model, METH_NOARGS, "(vendor, family) from CPUID, e.g. ('AuthenticAMD', 26); ('', 0) off x86."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
