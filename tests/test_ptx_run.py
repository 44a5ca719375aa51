"""tools/ptx_run.py itself: the semantics of the PTX instructions it interprets, and the faults it
must report (out-of-bounds and misaligned accesses, shared-memory races, divergent barriers,
unmodelled modifiers), on small hand-written kernels. Needs no build: the interpreter is Python."""
import numpy as np
import pytest

from conftest import load_emulation

ptx_run = load_emulation("ptx_run")

_HEADER = ".version 8.0\n.target sm_90\n.address_size 64\n"
_REGISTERS = """.reg .pred %p<8>;
.reg .b16 %rs<8>;
.reg .b32 %r<16>;
.reg .f32 %f<8>;
.reg .b64 %rd<8>;
.shared .align 16 .b8 sm[512];
"""


def run(body, threads=1, out_words=32, grid=(1,), dependent=False):
    """Runs `body` (the kernel's statements; %rd1 holds its one parameter, a buffer of out_words
    32-bit words poisoned with 0xFFFFFFFF) and returns (the buffer as uint32, the launch)."""
    text = (_HEADER + ".visible .entry k(.param .u64 k_out)\n{\n" + _REGISTERS
            + "ld.param.u64 %rd1, [k_out];\n" + body + "\nret;\n}\n")
    program = ptx_run.Program(ptx_run.Module(text), "k")
    mem = ptx_run.DeviceMemory()
    out = mem.upload(np.full(out_words, 0xFFFFFFFF, np.uint32), "out")
    launch = program.launch(mem, [out], grid=grid, block=(threads,), dependent=dependent)
    launch.read = lambda: mem.download(out, np.zeros(out_words, np.uint32))
    return launch.read(), launch


def value(body, dtype=np.uint32):
    """The first output word of a one-thread kernel that stores %r2 to out[0]."""
    words, _ = run(body + "\nst.global.u32 [%rd1], %r2;")
    return words.view(dtype)[0]


@pytest.mark.parametrize("body,expected,dtype", [
    ("mov.u32 %r1, 511;\ncvt.u8.u32 %r2, %r1;", 255, np.uint32),  # narrowed to the type, then extended
    ("mov.u32 %r1, 255;\ncvt.s8.s32 %r2, %r1;", -1, np.int32),
    ("mov.u32 %r1, 0x80000000;\nbfe.s32 %r2, %r1, 31, 4;", -1, np.int32),  # bits past the top: the sign
    ("mov.u32 %r1, 0x80000000;\nbfe.u32 %r2, %r1, 31, 4;", 1, np.uint32),
    ("mov.u32 %r1, -8;\nshr.s32 %r2, %r1, 40;", -1, np.int32),
    ("mov.u32 %r1, 1;\nshl.b32 %r2, %r1, 32;", 0, np.uint32),
    ("mov.u32 %r1, -3;\nmul.hi.s32 %r2, %r1, 5;", -1, np.int32),
    ("mov.u32 %r1, -7;\ndiv.s32 %r2, %r1, 2;", -3, np.int32),
    ("mov.u32 %r1, -7;\nrem.s32 %r2, %r1, 2;", -1, np.int32),
    ("mov.f32 %f1, 0fBECCCCCD;\ncvt.rni.f32.f32 %f2, %f1;\nmov.b32 %r2, %f2;", 0x80000000, np.uint32),  # -0
    ("mov.u64 %rd2, 4611686293305294849;\ncvt.rn.f32.s64 %f2, %rd2;\nmov.b32 %r2, %f2;", 0x5E800001, np.uint32),
    ("mov.f32 %f1, 0f80000000;\nrsqrt.approx.f32 %f2, %f1;\nmov.b32 %r2, %f2;", 0xFF800000, np.uint32),
    ("mov.f32 %f1, 0f7FC00000;\nsetp.ne.f32 %p1, %f1, %f1;\nselp.u32 %r2, 1, 0, %p1;", 0, np.uint32),
    ("mov.f32 %f1, 0f7FC00000;\nsetp.neu.f32 %p1, %f1, %f1;\nselp.u32 %r2, 1, 0, %p1;", 1, np.uint32),
    ("mov.f32 %f1, 0f3F800000;\nmov.f32 %f3, 0f40000000;\ncvt.rn.bf16x2.f32 %r2, %f1, %f3;", 0x3F804000, np.uint32),
    ("mov.f32 %f1, 0f3F808000;\ncvt.rn.bf16.f32 %rs1, %f1;\ncvt.u32.u16 %r2, %rs1;", 0x3F80, np.uint32),  # ties even
])
def test_instruction_semantics(body, expected, dtype):
    assert value(body, dtype) == expected


def test_scoped_registers_are_their_own():
    """Inline asm's scopes declare registers of the enclosing names; each scope's are its own."""
    body = """setp.eq.u32 %p1, 1, 1;
mov.u32 %r3, 0;
{
.reg .pred %p1;
setp.eq.u32 %p1, 1, 0;
@%p1 mov.u32 %r3, 9;
}
mov.u32 %r2, 0;
@%p1 mov.u32 %r2, 7;
add.u32 %r2, %r2, %r3;"""
    assert value(body) == 7


def test_shuffles_and_votes():
    """shfl.sync bfly / up / down / idx with the clamp and segment operand, vote.sync ballot."""
    body = """mov.u32 %r1, %laneid;
shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
shfl.sync.up.b32 %r3|%p1, %r1, 2, 0, -1;
shfl.sync.down.b32 %r4, %r1, 3, 0x181f, -1;
shfl.sync.idx.b32 %r5, %r1, 5, 0x181f, -1;
setp.lt.u32 %p2, %r1, 4;
vote.sync.ballot.b32 %r6, %p2, -1;
mul.wide.u32 %rd2, %r1, 4;
add.s64 %rd3, %rd1, %rd2;
st.global.u32 [%rd3], %r2;
st.global.u32 [%rd3+128], %r3;
st.global.u32 [%rd3+256], %r4;
st.global.u32 [%rd3+384], %r5;
st.global.u32 [%rd3+512], %r6;"""
    words, _ = run(body, threads=32, out_words=160)
    lane = np.arange(32)
    np.testing.assert_array_equal(words[0:32], lane ^ 1)
    np.testing.assert_array_equal(words[32:64], np.where(lane >= 2, lane - 2, lane))
    # width 8 (c = (32 - 8) << 8 | 31, as __shfl_down_sync passes it): down stays in a lane's 8
    np.testing.assert_array_equal(words[64:96], np.where(lane % 8 + 3 <= 7, lane + 3, lane))
    np.testing.assert_array_equal(words[96:128], lane // 8 * 8 + 5)
    np.testing.assert_array_equal(words[128:160], np.full(32, 0xF))


@pytest.mark.parametrize("body,fault,message", [
    ("st.global.u32 [%rd1+128], %r1;", ptx_run.MemoryFault, "outside every buffer"),
    ("ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1+4];", ptx_run.MemoryFault, "misaligned 16-byte"),
    ("mov.u32 %r1, sm;\nld.shared.u32 %r2, [%r1+4];", ptx_run.Race, "never written"),
    ("mov.u32 %r1, sm;\nst.shared.u32 [%r1+512], %r2;", ptx_run.MemoryFault, "outside the CTA"),
    ("mov.f32 %f1, 0f3F333333;\nadd.sat.f32 %f2, %f1, %f1;", NotImplementedError, "not modelled"),
    ("mov.f32 %f1, 0f3F800000;\ncvt.rz.f16.f32 %rs1, %f1;", NotImplementedError, "not modelled"),
    ("mov.u32 %r1, %tid.x;\nsetp.eq.u32 %p1, %r1, 0;\n@%p1 bra SKIP;\nbar.sync 0;\nbra.uni DONE;\n"
     "SKIP:\nbar.sync 0;\nDONE:", ptx_run.Deadlock, "different instructions"),
])
def test_faults_are_reported(body, fault, message):
    with pytest.raises(fault, match=message):
        run(body, threads=2, out_words=32)


def test_shared_memory_races_are_reported():
    """A read of another warp's write with no barrier between, and a write over another warp's
    read, are races; with bar.sync between, neither is."""
    prologue = """mov.u32 %r1, %tid.x;
mov.u32 %r2, sm;
shl.b32 %r3, %r1, 2;
add.u32 %r4, %r2, %r3;
st.shared.u32 [%r4], %r1;
bar.sync 0;
"""
    # warp 0 reads warp 1's words, then every thread writes its own
    read_other = ("xor.b32 %r5, %r3, 128;\nadd.u32 %r6, %r2, %r5;\nsetp.lt.u32 %p1, %r1, 32;\n"
                  "@%p1 ld.shared.u32 %r7, [%r6];\n")
    run(prologue + read_other + "bar.sync 0;\nst.shared.u32 [%r4], %r7;", threads=64)
    with pytest.raises(ptx_run.Race, match="read with no barrier"):
        run(prologue + read_other + "st.shared.u32 [%r4], %r7;", threads=64)
    with pytest.raises(ptx_run.Race, match="wrote with no barrier"):  # warp 1 reads warp 0's new words
        run(prologue + "st.shared.u32 [%r4], %r1;\n" + read_other.replace("@%p1", "@!%p1"), threads=64)


def test_cp_async_lands_at_its_wait():
    """A cp.async's destination is in flight until a wait_group retires its group."""
    copy = """mov.u32 %r1, sm;
st.global.u32 [%rd1+64], %r1;
cp.async.cg.shared.global [%r1], [%rd1+64], 16;
cp.async.commit_group;
"""
    words, _ = run(copy + "cp.async.wait_group 0;\nld.shared.u32 %r2, [%r1];\nst.global.u32 [%rd1], %r2;")
    assert words[0] == words[16]
    with pytest.raises(ptx_run.Race, match="not been waited for"):
        run(copy + "ld.shared.u32 %r2, [%r1];")


def test_dependent_launch_waits_for_its_prior_grid():
    """A CTA of a dependent launch runs up to griddepcontrol.wait; what it reads before the wait is
    memory before the prior grid, what it reads after is memory after (resume())."""
    body = """ld.global.u32 %r1, [%rd1+4];
griddepcontrol.wait;
ld.global.u32 %r2, [%rd1+4];
st.global.u32 [%rd1], %r1;
st.global.u32 [%rd1+8], %r2;"""
    text = (_HEADER + ".visible .entry k(.param .u64 k_out)\n{\n" + _REGISTERS
            + "ld.param.u64 %rd1, [k_out];\n" + body + "\nret;\n}\n")
    program = ptx_run.Program(ptx_run.Module(text), "k")
    mem = ptx_run.DeviceMemory()
    out = mem.upload(np.array([0, 1, 0], np.uint32), "out")
    launch = program.launch(mem, [out], grid=(1,), block=(1,), dependent=True)
    mem.write(out + 4, np.uint32(2).tobytes())  # the prior grid
    launch.resume()
    np.testing.assert_array_equal(mem.download(out, np.zeros(3, np.uint32)), [1, 2, 2])
