"""Dry-run stand-in for the CUDA build stage of scripts/gpu_check.sh: prints what ptxas -v and
cuobjdump -res-usage print for one kernel, or a compiler error when the stage is named in
GPU_CHECK_STUB_FAIL."""
import os
import sys

stage = sys.argv[1]
if stage in os.environ.get("GPU_CHECK_STUB_FAIL", "").split(","):
    print("csrc/cuda/stub.cu(1): error: identifier \"stub\" is undefined (GPU_CHECK_STUB_FAIL)", file=sys.stderr)
    sys.exit(1)
kernel = "_ZN9llama_ext4cuda11stub_kernelIfEEvNS0_10StubParamsE"
print(f"ptxas info    : Compiling entry function '{kernel}' for 'sm_90'")
print(f"ptxas info    : Function properties for {kernel}")
print("    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
print("ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]")
print(f"\tFunction {kernel}:")
print("\tREG:32 STACK:0 SHARED:128 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0")
