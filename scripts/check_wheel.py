"""The Python half of scripts/check_wheel.sh.

``contents WHEEL [--cuda]``: the wheel holds the package, the ``_C`` module and the CPU kernel
libraries (the portable one at least; which levels it must hold, tests/test_cpu_capability.py
checks once installed), pins torch to the minor version it was built against, and
carries no sources or build leftovers; prints each library's vector instruction counts (the
AVX-512 libraries hold AVX-512 code even when built on a CPU without it) and, with ``--cuda``,
the GPU architectures of the CUDA kernels in ``_C``.

``sdist SDIST``: the source distribution holds every file git tracks (but the CI entry point),
and no build outputs.

``smoke``: run from outside the repository in the environment the wheel was installed into:
``llama_ext`` comes from that environment, loads the best CPU level this CPU runs, and every op
matches its float64 reference once (forward, and the backward of the differentiable ones).
"""
import argparse
import email.parser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

LEVELS = ("default", "avx2", "avx512", "avx512_bf16", "amx_bf16")
# Instructions counted in each CPU library's disassembly: zmm registers are AVX-512, ymm AVX2,
# vdpbf16ps the AVX512-BF16 dot product and tdpbf16ps the AMX one of the bf16 tile products. tests/test_cpu_capability.py
# asserts which must (not) appear at each level; this prints how many there are.
COUNTED = ("ymm", "zmm", "vdpbf16ps", "tdpbf16ps")


def _fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def _tool(name):
    """An NVIDIA binary tool: on PATH, in the CUDA toolkit, or the copy triton ships."""
    for candidate in (shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import triton

        candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return candidate if os.path.exists(candidate) else None
    except ImportError:
        return None


def contents(args):
    wheel = args.wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(z.read(metadata_name).decode())
        unpacked = tempfile.mkdtemp()
        z.extractall(unpacked, [n for n in names if n.endswith(".so")])
    print(f"{os.path.basename(wheel)}: {len(names)} files, {os.path.getsize(wheel) / 1e6:.1f} MB")
    # abi3 (setup.py: py_limited_api): one wheel for every CPython from torch's oldest on.
    python_tag, abi_tag = os.path.basename(wheel)[:-len(".whl")].split("-")[2:4]
    if abi_tag != "abi3" or not re.fullmatch(r"cp3\d+", python_tag):
        _fail(f"the wheel is tagged {python_tag}-{abi_tag}, not cp3X-abi3 (the limited API build)")
    print(f"tags: {python_tag}-{abi_tag}")
    suffix = ".abi3.so"
    main = f"llama_ext/_C{suffix}"
    levels = [lvl for lvl in LEVELS if f"llama_ext/_cpu_{lvl}{suffix}" in names]
    if main not in names or "default" not in levels:
        _fail(f"the wheel lacks {main} or the portable CPU library (it holds {[n for n in names if n.endswith('.so')]})")
    libraries = [main] + [f"llama_ext/_cpu_{lvl}{suffix}" for lvl in levels]
    extra = [n for n in names if n.endswith(".so") and n not in libraries]
    if extra:
        _fail(f"libraries the build should not have made: {extra}")
    print(f"CPU levels: {', '.join(levels)}")
    strays = [n for n in names if not (n.startswith("llama_ext/") or ".dist-info/" in n)]
    strays += [n for n in names if n.endswith((".o", ".cpp", ".cu", ".h", ".cuh", ".pyc"))]
    if strays:
        _fail(f"the wheel carries files other than the package: {strays[:10]}")

    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    requires = metadata.get_all("Requires-Dist") or []
    if f"torch=={major}.{minor}.*" not in requires:
        _fail(f"Requires-Dist {requires}: expected torch=={major}.{minor}.* (the torch it was built against)")
    print(f"Requires-Dist: {', '.join(requires)}")

    objdump = shutil.which("objdump")
    if objdump:  # the limited API holds only without libtorch_python (and without libpython)
        for name in libraries:
            headers = subprocess.run([objdump, "-p", os.path.join(unpacked, name)], capture_output=True, text=True,
                                     check=True).stdout
            needed = re.findall(r"NEEDED\s+(\S+)", headers)
            if any(lib.startswith(("libtorch_python", "libpython")) for lib in needed):
                _fail(f"{name} links {needed}: a limited API library must not need libtorch_python or libpython")
    for name in libraries[1:]:
        path = os.path.join(unpacked, name)
        line = f"  {os.path.basename(name)}: {os.path.getsize(path) / 1e6:.1f} MB"
        if objdump:
            text = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                                  check=True).stdout
            line += ", instructions using " + ", ".join(
                f"{m}: {sum(1 for row in text.splitlines() if m in row)}" for m in COUNTED)
        print(line)
    main = os.path.join(unpacked, main)
    print(f"  {os.path.basename(main)}: {os.path.getsize(main) / 1e6:.1f} MB")
    if args.cuda:
        cuobjdump = _tool("cuobjdump")
        if cuobjdump is None:
            _fail("--cuda, but no cuobjdump (CUDA toolkit or triton) to list the CUDA kernels")
        listing = subprocess.run([cuobjdump, "--list-elf", main], capture_output=True, text=True).stdout
        archs = sorted(set(re.findall(r"\.(sm_\d+a?)\.", listing)))
        ptx = subprocess.run([cuobjdump, "--list-ptx", main], capture_output=True, text=True).stdout
        ptx_archs = sorted(set(re.findall(r"\.(sm_\d+a?)\.", ptx)))
        print(f"  CUDA kernels in _C: {len(listing.splitlines())} ELF images for {', '.join(archs) or 'none'}; "
              f"PTX for {', '.join(ptx_archs) or 'none'}")
        if not {"sm_80", "sm_90"} <= set(archs):
            _fail("the CUDA build lacks sm_80 or sm_90 kernels")
    shutil.rmtree(unpacked)


def smoke(args):
    import torch

    import llama_ext
    from llama_ext import _cpu_kernels, reference

    package = os.path.dirname(os.path.abspath(llama_ext.__file__))
    if os.path.realpath(package) != os.path.realpath(os.path.join(sysconfig.get_paths()["purelib"], "llama_ext")):
        _fail(f"llama_ext was imported from {package}, not from this environment's site-packages")
    runnable = [n for n, missing in _cpu_kernels.levels().items() if missing is None and _cpu_kernels.library_path(n)]
    capability = llama_ext.cpu_capability()
    print(f"llama_ext from {package}; cpu_capability() = {capability} (this CPU runs {', '.join(runnable)}); "
          f"CUDA kernels built: {llama_ext.cuda_kernels_built()}")
    if capability != runnable[-1] and not os.environ.get(_cpu_kernels.ENV_VAR):
        _fail(f"loaded {capability}, but the best level this CPU runs is {runnable[-1]}")

    torch.manual_seed(0)
    dtype, atol = torch.float32, 1e-4
    failures = []

    def check(name, actual, expected):
        error = (actual.double() - expected.double()).abs().max().item()
        print(f"  {name}: max error {error:.1e} against the float64 reference")
        if not error <= atol:
            failures.append(name)

    def leaf(*shape):
        return (torch.randn(*shape, dtype=dtype) + 0.1).requires_grad_()

    x, res, w = leaf(4, 7, 96), leaf(4, 7, 96), leaf(96)
    y = llama_ext.rms_norm(x, w, eps=1e-6)
    check("rms_norm", y, reference.rms_norm_reference(x, w, 1e-6))
    grad = torch.randn_like(y)
    ref_grads = torch.autograd.grad(reference.rms_norm_reference(x.double(), w.double(), 1e-6), (x, w), grad.double())
    for name, g, r in zip(("dx", "dweight"), torch.autograd.grad(y, (x, w), grad), ref_grads):
        check(f"rms_norm backward {name}", g, r)
    y, s = llama_ext.fused_add_rms_norm(x.detach(), res.detach(), w.detach(), eps=1e-6, offset=1.0,
                                        cast_before_weight=False)
    ref_y, ref_s = reference.fused_add_rms_norm_reference(x, res, w, 1e-6, offset=1.0)
    check("fused_add_rms_norm", y, ref_y)
    check("fused_add_rms_norm residual", s, ref_s)

    batch, seq, hq, hkv, d = 2, 37, 8, 2, 64
    cos, sin = llama_ext.rope_cos_sin(d, 128)
    q, k, v = leaf(batch, seq, hq, d), leaf(batch, seq, hkv, d), leaf(batch, seq, hkv, d)
    positions = torch.randint(0, 128, (batch, seq))
    q2, k2 = llama_ext.apply_rotary(q, k, cos, sin, positions)
    check("apply_rotary q", q2, reference.rotary_reference(q, cos, sin, positions))
    check("apply_rotary k", k2, reference.rotary_reference(k, cos, sin, positions))

    out, lse = llama_ext.gqa_attention(q, k, v, causal=True, return_lse=True, window_size=(15, 0), softcap=30.0)
    ref_out, ref_lse = reference.gqa_attention_reference(q.double(), k.double(), v.double(), True, None, (15, 0), 30.0)
    check("gqa_attention", out, ref_out)
    check("gqa_attention lse", lse, ref_lse)
    grad = torch.randn_like(out)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), grad),
                          torch.autograd.grad(ref_out, (q, k, v), grad.double())):
        check(f"gqa_attention backward {name}", g, r)

    cu = torch.tensor([0, 5, 37], dtype=torch.int32)
    flat = [t.detach()[0] for t in (q, k, v)]
    out = llama_ext.gqa_attention_varlen(*flat, cu, cu, 32, 32, causal=True)
    check("gqa_attention_varlen", out, reference.gqa_attention_varlen_reference(*flat, cu, cu, True)[0])

    capacity = 64
    k_cache, v_cache = (torch.randn(batch, capacity, hkv, d, dtype=dtype) for _ in range(2))
    seqlens = torch.tensor([0, 40], dtype=torch.int32)
    q1, k1, v1 = (torch.randn(batch, 1, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    expected = reference.gqa_attention_with_kvcache_reference(q1, k_cache, v_cache, seqlens, k1, v1, rotary_cos=cos,
                                                              rotary_sin=sin)
    out = llama_ext.gqa_attention_with_kvcache(q1, k_cache, v_cache, seqlens, k=k1, v=v1, rotary_cos=cos,
                                               rotary_sin=sin)
    check("gqa_attention_with_kvcache", out, expected[0])
    check("gqa_attention_with_kvcache k_cache", k_cache, expected[2])
    if failures:
        _fail(f"outside {atol:g} of the float64 reference: {failures}")
    print("every op matches its float64 reference")


def sdist_problems(sdist, repo):
    """(tracked files the sdist lacks, build outputs it carries). Every tracked file belongs in
    it, but the CI entry point (.ci/) and git's own files."""
    import tarfile

    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if not f.startswith((".ci/", ".git")) and f not in names]
    built = sorted(n for n in names if n.endswith((".so", ".o")) or n.startswith("build/"))
    return missing, built


def sdist(args):
    missing, built = sdist_problems(args.sdist, os.getcwd())
    if missing or built:
        _fail(f"the sdist lacks {missing} / carries build outputs {built}")
    print(f"{args.sdist}: every tracked source, header, test, tool, benchmark and script; no build outputs")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("contents")
    c.add_argument("wheel")
    c.add_argument("--cuda", action="store_true", help="the wheel must hold CUDA kernels for sm_80 and sm_90")
    c.set_defaults(run=contents)
    d = sub.add_parser("sdist")
    d.add_argument("sdist")
    d.set_defaults(run=sdist)
    s = sub.add_parser("smoke")
    s.set_defaults(run=smoke)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
