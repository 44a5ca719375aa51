// The level this CPU kernel library was compiled for (capability.h), exported so that the
// loader (llama_ext/_cpu_kernels.py) can check it loaded the library it meant to.
#include "capability.h"

extern "C" __attribute__((visibility("default"))) const char* llama_ext_cpu_capability() { return LLAMA_EXT_CPU_LEVEL; }
