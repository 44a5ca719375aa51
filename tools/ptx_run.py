"""Runs a kernel's PTX, as the built extension embeds it, thread by thread on the CPU.

Where tools/ptx_emu.py and the emulate_*.py files transcribe the tensor-core kernels by hand,
this module interprets the compiler's own output: the PTX that `cuobjdump -xptx` extracts from
llama_ext/_C*.so (the arch the build embeds as PTX, its last one: compute_120 or compute_90). So
a kernel that has only compiled can run here on small launches, with its real index math, tails,
barriers and shuffles, and its results can be compared with float64 references.

What it models:
- every thread of a CTA, each with its own registers and program counter; threads run one after
  another up to their next barrier or warp collective, which the scheduler then resolves: a
  barrier (bar.sync, bar.red) when every live thread of the CTA waits at it, at one instruction
  (.aligned); a collective (shfl.sync, vote.sync, ldmatrix, mma, bar.warp.sync) when every lane
  of its member mask waits at the same instruction. Anything else is a deadlock or a divergent
  collective, reported with the waiting threads' places;
- ldmatrix and mma.m16n8k16 with their fragments as the PTX ISA lays them out, the product in
  float64 rounded once to fp32; cp.async with the source read at issue and the destination
  landing at the wait_group that retires its group;
- a dependent launch (launch(dependent=True)): each CTA runs up to its griddepcontrol.wait, and
  resume() runs the rest once the caller has run the grid it depends on;
- memory as compute-sanitizer's memcheck sees it: global accesses only inside the buffers handed
  to launch() (DeviceMemory), shared ones only inside the CTA's allocation, each aligned to its
  size; and as racecheck does for shared memory: a read of bytes never written or whose cp.async
  is in flight, or a read or write against another thread's access since the last barrier (or,
  within a warp, since its last __syncwarp), raises Race; so does ld.global.nc of bytes the same
  launch wrote;
- device asserts (a call to __assertfail) raise DeviceAssert, or with record_asserts are listed
  in the launch's `asserts` and the thread goes on (what the kernel does where asserts are
  compiled out);
- a register read before any write (C++'s unused uninitialized values, which the compiler keeps
  as they are) reads all ones: NaN as a float, -1 as an integer, so that a use shows;
- fp32 arithmetic rounded to fp32 at every instruction (fma as a product and a sum in float64,
  then one rounding: exact products, a rare double rounding), .ftz flushes, fp16 and bf16
  conversions with round to nearest even, and the .approx functions computed exactly (the GPU's
  differ by a few ulp, more for tanh / sin / cos and near their range limits, e.g. div.approx of
  a divisor above 2^126 gives 0 there: code that leans on those edges is not checked here).

What it does not: CTAs in parallel (they run one after another: no races between CTAs), races
through global memory inside a CTA, timing, caches, the other mma shapes; an instruction with a
modifier it does not model (saturation, directed rounding, relu, ...) is refused. It is slow
(Python, a few microseconds per instruction per thread): launches of a few CTAs."""

import bisect
import ctypes
import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class DeviceAssert(AssertionError):
    pass


class Race(AssertionError):
    pass


class MemoryFault(AssertionError):
    """An access outside every buffer (global) or outside the CTA's shared memory."""


class Deadlock(AssertionError):
    pass


# ---- Finding and reading the PTX ----------------------------------------------------------------

def cuobjdump():
    """cuobjdump on PATH, in $CUDA_HOME (or $CUDA_PATH)/bin, or shipped in triton's package; None
    if none is found."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for root in triton.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def extension_library():
    """The built llama_ext._C library, or None when the package was built without CUDA."""
    libs = sorted((REPO / "llama_ext").glob("_C*.so"))
    return libs[0] if libs else None


def embedded_ptx(source_stem: str, library=None) -> str:
    """The PTX the library embeds for csrc/cuda/<source_stem>.cu (the last, where there are several)."""
    tool, library = cuobjdump(), library or extension_library()
    if tool is None or library is None:
        raise FileNotFoundError("needs cuobjdump and a CUDA build of llama_ext._C")
    listing = subprocess.run([tool, "-lptx", str(library)], capture_output=True, text=True).stdout  # none: no CUDA
    names = re.findall(r"PTX file\s+\d+:\s+(\S+)", listing)
    matches = [n for n in names if n.split(".")[0] == source_stem]
    if not matches:
        raise FileNotFoundError(f"no embedded PTX for {source_stem}.cu in {library} (found {names})")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xptx", matches[-1], str(library)], cwd=tmp, capture_output=True, check=True)
        return (Path(tmp) / matches[-1]).read_text()


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


# ---- Values ---------------------------------------------------------------------------------------

_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")
_F64, _U64 = struct.Struct("<d"), struct.Struct("<Q")
_F16, _U16 = struct.Struct("<e"), struct.Struct("<H")
FLT_MIN = 1.1754943508222875e-38


def f32_of(bits):
    return _F32.unpack(_U32.pack(bits & 0xFFFFFFFF))[0]


def bits_of_f32(x):
    try:
        return _U32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return 0x7F800000 if x > 0 else 0xFF800000


def f64_of(bits):
    return _F64.unpack(_U64.pack(bits & 0xFFFFFFFFFFFFFFFF))[0]


def bits_of_f64(x):
    return _U64.unpack(_F64.pack(x))[0]


def f16_of(bits):
    return _F16.unpack(_U16.pack(bits & 0xFFFF))[0]


def bits_of_f16(x):  # round to nearest even from an fp32 value (exact in float64)
    try:
        return _U16.unpack(_F16.pack(x))[0]
    except OverflowError:
        return 0x7C00 if x > 0 else 0xFC00


def bf16_of(bits):
    return f32_of((bits & 0xFFFF) << 16)


def bits_of_bf16(x):  # round to nearest even
    b = bits_of_f32(x)
    if (b & 0x7F800000) == 0x7F800000 and (b & 0x7FFFFF):
        return ((b >> 16) | 0x40) & 0xFFFF
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def ftz(x):
    return math.copysign(0.0, x) if x != 0.0 and abs(x) < FLT_MIN else x


def width_of(t):
    """Bits of a PTX type (.b32 -> 32, .f16x2 -> 32, .pred -> 1)."""
    if t == "pred":
        return 1
    if t.endswith("x2"):
        return 2 * int(t[-4:-2])
    return int(re.sub(r"^[a-z]+", "", t))


def to_signed(v, w):
    v &= (1 << w) - 1
    return v - (1 << w) if v >> (w - 1) else v


class Float:
    """Reading and writing a float type's values from register bits."""

    def __init__(self, t, flush):
        self.w = width_of(t)
        if t == "f32":
            self.get = (lambda b: ftz(f32_of(b))) if flush else f32_of
            self.put = (lambda x: bits_of_f32(ftz(_round32(x)))) if flush else bits_of_f32
        elif t == "f64":
            self.get, self.put = f64_of, bits_of_f64
        elif t == "f16":
            self.get, self.put = f16_of, bits_of_f16
        elif t == "bf16":
            self.get, self.put = bf16_of, bits_of_bf16
        else:
            raise NotImplementedError(t)


def _round32(x):
    return f32_of(bits_of_f32(x))


# ---- Memory -----------------------------------------------------------------------------------------

GLOBAL_BASE = 0x10_0000_0000
MODULE_GLOBALS = 0x08_0000_0000  # a module's .global variables, below every buffer
SHARED_WINDOW = 0x7E_0000_0000
LOCAL_WINDOW = 0x7F_0000_0000
PARAM_WINDOW = 0x7D_0000_0000


class DeviceMemory:
    """Global memory: numpy buffers at made-up device addresses, 256-byte aligned, with a 4 KB gap
    between buffers so that an overrun lands outside every one."""

    def __init__(self):
        self.bases, self.buffers, self.names = [], [], []
        self.next = GLOBAL_BASE

    def alloc(self, nbytes, name="buffer", fill=None):
        buf = np.zeros(max(int(nbytes), 1), np.uint8) if fill is None else np.full(max(int(nbytes), 1), fill, np.uint8)
        base = self.next
        self.next = (base + len(buf) + 4096 + 255) // 256 * 256
        self.bases.append(base)
        self.buffers.append(buf)
        self.names.append(name)
        return base

    def place(self, address, raw, name):
        """Maps `raw` at a fixed address (a module's .global variables), once."""
        if address in self.bases:
            return
        i = bisect.bisect(self.bases, address)
        self.bases.insert(i, address)
        self.buffers.insert(i, np.frombuffer(bytes(raw), np.uint8).copy())
        self.names.insert(i, name)

    def upload(self, array, name="buffer"):
        """A device copy of a numpy array or CPU tensor, laid out as it is (strides kept: the span
        of storage it covers); returns the address of its first element."""
        raw = _storage_span(array)
        base = self.alloc(len(raw), name)
        self.buffers[-1][: len(raw)] = np.frombuffer(raw, np.uint8)
        return base

    def download(self, address, like):
        """The values at `address`, laid out (shape, strides, dtype) like the numpy array or CPU
        tensor `like`, as a new contiguous array or tensor."""
        raw = self.read(address, len(_storage_span(like)))
        try:
            import torch
            if isinstance(like, torch.Tensor):
                flat = torch.frombuffer(bytearray(raw), dtype=like.dtype) if raw else torch.empty(0, dtype=like.dtype)
                return flat.as_strided(like.shape, like.stride()).clone()
        except ImportError:
            pass
        flat = np.frombuffer(raw, like.dtype)
        return np.lib.stride_tricks.as_strided(flat, like.shape, like.strides).copy()

    def _find(self, address, size, what):
        i = bisect.bisect_right(self.bases, address) - 1
        if i >= 0:
            off = address - self.bases[i]
            if off + size <= len(self.buffers[i]):
                return self.buffers[i], off
        near = f" ({self.names[i]} at +{address - self.bases[i]}, {len(self.buffers[i])} bytes)" if i >= 0 else ""
        raise MemoryFault(f"global {what} of {size} bytes at {address:#x} outside every buffer{near}")

    def read(self, address, size):
        buf, off = self._find(address, size, "read")
        return buf[off: off + size].tobytes()

    def write(self, address, data, written=None):
        """`written`: a launch's record (buffer -> bytes it wrote), for check_unwritten."""
        buf, off = self._find(address, len(data), "write")
        buf[off: off + len(data)] = np.frombuffer(data, np.uint8)
        if written is not None:
            written.setdefault(id(buf), np.zeros(len(buf), bool))[off: off + len(data)] = True

    def check_unwritten(self, address, size, written):
        """ld.global.nc (the read-only path) of bytes the same launch wrote reads stale data."""
        buf, off = self._find(address, size, "read")
        mask = written.get(id(buf))
        if mask is not None and mask[off: off + size].any():
            raise Race(f"ld.global.nc of {size} bytes at {address:#x} that this launch wrote")


def _storage_span(array):
    """The bytes from an array's first element to its last, in storage order."""
    try:
        import torch
        if isinstance(array, torch.Tensor):
            t = array.detach().cpu()
            if t.numel() == 0:
                return b""
            extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            span = t.as_strided((extent,), (1,), t.storage_offset()).contiguous()
            return span.view(torch.uint8).numpy().tobytes()
    except ImportError:
        pass
    a = np.asarray(array)
    if a.size == 0:
        return b""
    extent = 1 + sum((n - 1) * st for n, st in zip(a.shape, a.strides)) // a.itemsize
    return np.lib.stride_tricks.as_strided(a.reshape(-1)[:1], (extent,), (a.itemsize,)).tobytes()


class SharedMemory:
    """One CTA's shared memory, with who wrote each byte and in which barrier interval."""

    def __init__(self, size):
        self.data = bytearray(size)
        self.cta_epoch = 0  # barrier intervals so far
        self.in_flight = np.zeros(size, bool)
        # Per byte, its last write's and its last read's thread (-1: none), barrier interval and
        # that thread's warp's __syncwarp count then.
        self.writer, self.reader = np.full(size, -1, np.int64), np.full(size, -1, np.int64)
        self.write_epoch, self.read_epoch = np.zeros(size, np.int64), np.zeros(size, np.int64)
        self.write_warp_epoch, self.read_warp_epoch = np.zeros(size, np.int64), np.zeros(size, np.int64)

    def _range(self, address, size, t):
        if address < 0 or address + size > len(self.data):
            raise MemoryFault(f"shared access of {size} bytes at {address} outside the CTA's {len(self.data)} bytes "
                              f"(thread {t.tid})")
        return slice(address, address + size)

    def _unordered(self, who, epoch, warp_epoch, t):
        """Which of these accesses (by thread `who` in barrier interval `epoch`) another thread made
        since the last barrier and, within t's warp, since its last __syncwarp: a race with t's."""
        same_warp = (who // 32) == t.tid // 32
        return (who >= 0) & (who != t.tid) & (epoch == self.cta_epoch) & ~(same_warp & (warp_epoch < t.warp.epoch))

    def _race(self, mask, who, address, what):
        if mask.any():
            j = int(np.argmax(mask))
            raise Race(what.format(other=int(who[j]), byte=address + j))

    def read(self, address, size, t):
        s = self._range(address, size, t)
        if self.in_flight[s].any():
            raise Race(f"thread {t.tid} reads shared bytes [{address}, {address + size}) whose cp.async has not "
                       f"been waited for")
        w = self.writer[s]
        if (w < 0).any():
            raise Race(f"thread {t.tid} reads shared bytes [{address}, {address + size}) never written")
        self._race(self._unordered(w, self.write_epoch[s], self.write_warp_epoch[s], t), w, address,
                   f"thread {t.tid} reads shared byte {{byte}} that thread {{other}} wrote with no barrier between")
        self.reader[s], self.read_epoch[s], self.read_warp_epoch[s] = t.tid, self.cta_epoch, t.warp.epoch
        return bytes(self.data[s])

    def reserve(self, address, size, t):
        """A cp.async's destination, in flight until land(): read it, and it is a race."""
        s = self._range(address, size, t)
        self.in_flight[s] = True

    def land(self, address, data, t):
        self.in_flight[address: address + len(data)] = False
        self.write(address, data, t, landing=True)

    def write(self, address, data, t, landing=False):
        s = self._range(address, len(data), t)
        if not landing and self.in_flight[s].any():
            raise Race(f"thread {t.tid} writes shared bytes [{address}, {address + len(data)}) that a cp.async has "
                       f"in flight")
        r, w = self.reader[s], self.writer[s]
        self._race(self._unordered(r, self.read_epoch[s], self.read_warp_epoch[s], t), r, address,
                   f"thread {t.tid} writes shared byte {{byte}} that thread {{other}} read with no barrier between")
        self._race(self._unordered(w, self.write_epoch[s], self.write_warp_epoch[s], t), w, address,
                   f"threads {{other}} and {t.tid} write shared byte {{byte}} with no barrier between")
        self.data[s] = data
        self.writer[s], self.write_epoch[s], self.write_warp_epoch[s] = t.tid, self.cta_epoch, t.warp.epoch


# ---- Parsing ------------------------------------------------------------------------------------------

@dataclass
class Param:
    name: str
    offset: int
    size: int
    type: str  # 'b8' for a byte array (struct by value), else its scalar type


@dataclass
class Kernel:
    name: str
    params: list
    statements: list  # (label or None, predicate, opcode, operand text)
    shared: list      # (name, size, align), static, in order
    local: list       # (name, size, align)
    reg_width: dict   # register prefix -> bits
    demangled: str = ""
    param_size: int = 0  # all parameters' bytes


_REG_DECL = re.compile(r"\.reg\s+\.(\w+)\s+(%?[\w$]+?)(?:<(\d+)>)?$")
_VAR_DECL = re.compile(r"(?:\.extern\s+)?\.(shared|local|global|const)\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+"
                       r"([\w$.]+)(?:\[(\d*)\])?(?:\s*=\s*\{(.*)\})?$")


class Module:
    """The kernels and module-level variables of one PTX text."""

    def __init__(self, text):
        text = re.sub(r"//[^\n]*", "", text)
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        self.text = text
        self.globals = {}  # name -> (bytes, align)
        self.extern_shared = None
        self.entries = {}
        for m in re.finditer(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", text, re.M):
            self.entries[m.group(1)] = m.start()
        for m in re.finditer(r"^(?:\.visible\s+)?(\.extern\s+)?\.(global|shared|const)\s[^;]*;", text, re.M):
            stmt = m.group(0).strip().rstrip(";")
            stmt = re.sub(r"^\.visible\s+", "", stmt)
            d = _VAR_DECL.match(stmt)
            if not d:
                continue
            space, align, t, name, count, init = d.groups()
            if space == "shared":
                self.extern_shared = name if count == "" else self.extern_shared
                continue
            elem = width_of(t) // 8 if t != "pred" else 1
            n = int(count) if count else 1
            raw = bytearray(elem * n)
            if init:
                vals = [int(v, 0) for v in init.split(",") if v.strip()]
                for i, v in enumerate(vals):
                    raw[i * elem:(i + 1) * elem] = (v & ((1 << (8 * elem)) - 1)).to_bytes(elem, "little")
            self.globals[name] = (bytes(raw), int(align or elem))
        names = list(self.entries)
        self.demangled = dict(zip(names, demangle(names)))
        self._kernels = {}

    def kernels(self, match=lambda demangled: True):
        """Names of the entries whose demangled signature satisfies `match`."""
        return [n for n in self.entries if match(self.demangled[n])]

    def kernel(self, name) -> Kernel:
        if name not in self._kernels:
            self._kernels[name] = self._parse_entry(name)
        return self._kernels[name]

    def _parse_entry(self, name):
        start = self.entries[name]
        open_paren = self.text.index("(", start)
        close_paren = self.text.index(")", open_paren)
        params, offset = [], 0
        for decl in self.text[open_paren + 1: close_paren].split(","):
            decl = decl.strip()
            if not decl:
                continue
            decl = re.sub(r"\.ptr(\s+\.(global|shared|const|local))?(\s+\.align\s+\d+)?", "", decl)
            m = re.match(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([\w$]+)(?:\[(\d+)\])?", decl)
            align, t, pname, count = m.groups()
            size = (width_of(t) // 8) * (int(count) if count else 1)
            a = int(align) if align else width_of(t) // 8
            offset = (offset + a - 1) // a * a
            params.append(Param(pname, offset, size, t))
            offset += size
        body_open = self.text.index("{", close_paren)
        depth, i = 0, body_open
        while True:
            c = self.text[i]
            depth += c == "{"
            depth -= c == "}"
            i += 1
            if depth == 0:
                break
        body = self.text[body_open + 1: i - 1]
        statements, shared, local, reg_width = [], [], [], {}
        scopes = []  # per open scope: its registers' names -> names unique in the kernel
        for raw in _statements(body):
            stmt = " ".join(raw.split())
            if stmt == "{":
                scopes.append({})
                continue
            if stmt == "}":
                scopes.pop()
                continue
            if stmt.startswith(".reg") and scopes:  # a scope's own register(s), renamed for the kernel
                m = _REG_DECL.match(stmt)
                if m:
                    width, declared, count = width_of(m.group(1)), m.group(2), m.group(3)
                    for reg in ([declared] if count is None else [f"{declared}{i}" for i in range(int(count))]):
                        unique = f"{reg}__scope{len(reg_width)}"
                        scopes[-1][reg] = unique
                        reg_width[unique] = width
                continue
            renames = {k: v for scope in scopes for k, v in scope.items()}  # the innermost last
            if renames:
                stmt = _REGISTER_TOKEN.sub(lambda m: renames.get(m.group(0), m.group(0)), stmt)
            while True:  # labels end with ':'
                m = re.match(r"^([\w$]+):\s*(.*)$", stmt)
                if not m:
                    break
                statements.append((m.group(1), None, "label", ""))
                stmt = m.group(2)
            if not stmt:
                continue
            if stmt.startswith(".reg"):
                m = _REG_DECL.match(stmt)
                if m:
                    reg_width[m.group(2)] = width_of(m.group(1))
                continue
            if stmt.startswith((".shared", ".local")):
                d = _VAR_DECL.match(stmt)
                space, align, t, vname, count, _ = d.groups()
                size = (width_of(t) // 8) * int(count or 1)
                (shared if space == "shared" else local).append((vname, size, int(align or 1)))
                continue
            if stmt.startswith(".param"):  # a call sequence's argument: thread-local param space
                m = re.match(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+([\w$]+)(?:\[(\d+)\])?", stmt)
                local.append((m.group(2), (width_of(m.group(1)) // 8) * int(m.group(3) or 1), 8))
                continue
            if stmt.startswith("."):  # .maxntid, .pragma, ...
                continue
            pred = None
            m = re.match(r"^@(!?)(%\w+)\s+(.*)$", stmt)
            if m:
                pred = (m.group(1) == "!", m.group(2))
                stmt = m.group(3)
            op, _, rest = stmt.partition(" ")
            statements.append((None, pred, op, rest.strip()))
        k = Kernel(name, params, statements, shared, local, reg_width, self.demangled[name])
        k.param_size = offset
        return k


_REGISTER_TOKEN = re.compile(r"(?<![\w$.%])%?[A-Za-z_$][\w$]*")
_LABELS_ONLY = re.compile(r"^\s*([\w$]+:\s*)*$")


def _statements(body):
    """A body's statements without their ';'. Line-info directives (.loc, no ';') are dropped; a
    brace where a statement would begin opens or closes a scope (inline asm, a call sequence) and
    is a statement of its own, "{" or "}"; a brace inside a statement is a vector operand's."""
    text = " ".join(ln for ln in body.splitlines() if not ln.strip().startswith((".loc", ".file")))
    out, cur = [], []
    for c in text:
        if c in "{}" and _LABELS_ONLY.match("".join(cur)):
            if "".join(cur).strip():
                out.append("".join(cur))
                cur = []
            out.append(c)  # a scope's start or end: its registers are its own
            continue
        if c == ";":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


# ---- Compiling statements to closures --------------------------------------------------------------------

SPECIAL = {"%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x", "%ctaid.y", "%ctaid.z",
           "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid", "%warpid", "%nwarpid", "%smid", "%nsmid",
           "%lanemask_lt", "%lanemask_le", "%lanemask_eq", "%lanemask_gt", "%lanemask_ge"}


def split_operands(text):
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_immediate(text, t):
    """An immediate's bits for type t: 0fXXXXXXXX / 0dXXXXXXXXXXXXXXXX hex floats, ints, decimals."""
    if text.startswith(("0f", "0F")):
        bits = int(text[2:], 16)
        return bits if t == "f32" or not t.startswith("f") else bits_of_f64(f32_of(bits))
    if text.startswith(("0d", "0D")):
        return int(text[2:], 16)
    if re.match(r"^-?\d+\.\d*(e[-+]?\d+)?$", text) or "e" in text and not text.startswith("0x"):
        v = float(text)
        return bits_of_f64(v) if t == "f64" else bits_of_f32(v)
    v = int(text.rstrip("U"), 0)
    w = width_of(t) if t not in ("pred",) else 1
    return v & ((1 << w) - 1)


# Modifiers that change an instruction's result and that the handlers do not model (saturation,
# directed rounding, relu, NaN propagation, carries): an instruction with one is refused rather
# than computed as if it were absent. cvt models .sat and, from integers to f32, rz / rm / rp.
_UNMODELLED = {"sat", "satfinite", "relu", "NaN", "xorsign", "abs", "cc", "rz", "rm", "rp", "rna", "rs", "oob"}
_CVT_MODELLED = {"sat", "rz", "rm", "rp"}


class Compiler:
    """Turns a kernel's statements into closures over a thread state."""

    def __init__(self, kernel: Kernel, symbols):
        self.k, self.symbols = kernel, symbols

    def reg_mask(self, name):
        w = self.k.reg_width.get(name)  # a register declared alone (inline asm's `tmp`)
        if w is None:
            w = self.k.reg_width.get(re.match(r"(%?[a-zA-Z_$]+)", name).group(1))
        if w is None:
            return 0xFFFFFFFFFFFFFFFF
        return (1 << w) - 1

    # An operand read as bits of width w (signed values already masked).
    def src(self, text, t):
        w = width_of(t) if t != "pred" else 1
        mask = (1 << w) - 1
        if (text.startswith("%") and text not in SPECIAL) or text in self.k.reg_width:
            name = text
            return lambda th: th.r.get(name, mask) & mask  # never written: all ones (NaN as a float)
        if text in SPECIAL:
            return lambda th: th.special(text) & mask
        if text in self.symbols:
            v = self.symbols[text]
            return lambda th: v & mask
        m = re.match(r"^([\w$]+)\+(-?\d+)$", text)
        if m and m.group(1) in self.symbols:
            v = self.symbols[m.group(1)] + int(m.group(2))
            return lambda th: v & mask
        if text.startswith("!%"):
            name = text[1:]
            return lambda th: (th.r[name] ^ 1) & 1
        v = parse_immediate(text, t)
        return lambda th: v

    def dst(self, text):
        if text == "_":
            return lambda th, v: None
        name = text
        mask = self.reg_mask(name)
        def put(th, v):
            th.r[name] = v & mask
        return put

    def address(self, text):
        """[reg+off], [symbol+off], [imm]: the address as an int."""
        inner = text.strip()[1:-1].strip()
        m = re.match(r"^([^+]+?)(?:\+(-?\w+))?$", inner)
        base, off = m.group(1).strip(), int(m.group(2), 0) if m.group(2) else 0
        if base.startswith("%"):
            return lambda th: (th.r[base] + off) & 0xFFFFFFFFFFFFFFFF
        if base in self.symbols:
            v = self.symbols[base] + off
            return lambda th: v
        v = int(base, 0) + off
        return lambda th: v

    def compile(self):
        labels, code, collective = {}, [], []
        pc = 0
        for stmt in self.k.statements:
            if stmt[2] == "label":
                labels[stmt[0]] = pc
            else:
                pc += 1
        self.labels = labels
        for label, pred, op, rest in self.k.statements:
            if op == "label":
                continue
            fn, coll = self.instruction(op, rest)
            if pred is not None:
                neg, pname = pred
                inner = fn
                if coll and coll[0] == "bar":
                    raise NotImplementedError(f"a predicated barrier: @{pname} {op} {rest}")
                if coll:
                    coll = (coll, neg, pname)
                else:
                    def fn(th, inner=inner, neg=neg, pname=pname):
                        if th.r.get(pname, 1) ^ neg:
                            inner(th)
            elif coll:
                coll = (coll, False, None)
            code.append(fn)
            collective.append(coll)
        def off_the_end(th):
            raise DeviceAssert(f"thread {th.tid} of CTA {th.cta.ctaid} ran past the kernel's last instruction")
        code.append(off_the_end)
        collective.append(None)
        return code, collective

    def instruction(self, op, rest):
        parts = op.split(".")
        base, mods = parts[0], parts[1:]
        unmodelled = _UNMODELLED & set(mods) - (_CVT_MODELLED if base == "cvt" else set())
        if unmodelled:
            raise NotImplementedError(f"PTX instruction {op}: modifier {sorted(unmodelled)} is not modelled")
        ops = split_operands(rest)
        handler = getattr(self, "op_" + base, None)
        if handler is None:
            raise NotImplementedError(f"PTX instruction {op} {rest}")
        result = handler(mods, ops)
        return result if isinstance(result, tuple) else (result, None)

    # -- data movement
    def op_mov(self, mods, ops):
        t = mods[-1]
        d, a = ops
        if d.startswith("{"):  # unpack: mov.b32 {lo, hi}, r
            names = [x.strip() for x in d[1:-1].split(",")]
            w = width_of(t) // len(names)
            src = self.src(a, t)
            puts = [self.dst(n) for n in names]
            def f(th):
                v = src(th)
                for i, p in enumerate(puts):
                    p(th, v >> (i * w))
            return f
        if a.startswith("{"):  # pack
            names = [x.strip() for x in a[1:-1].split(",")]
            w = width_of(t) // len(names)
            srcs = [self.src(n, f"b{w}") for n in names]
            put = self.dst(d)
            def f(th):
                v = 0
                for i, s in enumerate(srcs):
                    v |= s(th) << (i * w)
                put(th, v)
            return f
        src, put = self.src(a, t), self.dst(d)
        return lambda th: put(th, src(th))

    def op_cvta(self, mods, ops):
        d, a = ops
        to = mods[0] == "to"
        space = mods[1] if to else mods[0]
        window = {"global": 0, "shared": SHARED_WINDOW, "local": LOCAL_WINDOW, "param": PARAM_WINDOW}[space]
        src, put = self.src(a, mods[-1]), self.dst(d)
        if to:
            return lambda th: put(th, src(th) - window)
        return lambda th: put(th, src(th) + window)

    def _space(self, mods):
        for s in ("global", "shared", "local", "param", "const"):
            if s in mods:
                return s
        return "generic"

    def op_ld(self, mods, ops):
        space = self._space(mods)
        t = mods[-1]
        vec = next((int(m[1:]) for m in mods if re.match(r"^v\d$", m)), 1)
        size = width_of(t) // 8
        signed = t.startswith("s")
        d, a = ops
        names = [x.strip() for x in d[1:-1].split(",")] if d.startswith("{") else [d]
        puts = [self.dst(n) for n in names]
        addr = self.address(a)
        non_coherent = "nc" in mods
        def f(th):
            raw = th.load(space, addr(th), size * vec, non_coherent)
            for i, p in enumerate(puts):
                v = int.from_bytes(raw[i * size:(i + 1) * size], "little", signed=signed)
                p(th, v)
        return f

    def op_st(self, mods, ops):
        space = self._space(mods)
        t = mods[-1]
        size = width_of(t) // 8
        a, s = ops
        names = [x.strip() for x in s[1:-1].split(",")] if s.startswith("{") else [s]
        srcs = [self.src(n, t) for n in names]
        addr = self.address(a)
        mask = (1 << (8 * size)) - 1
        def f(th):
            raw = b"".join((src(th) & mask).to_bytes(size, "little") for src in srcs)
            th.store(space, addr(th), raw)
        return f

    def op_prefetch(self, mods, ops):
        return lambda th: None

    op_prefetchu = op_prefetch

    def op_fence(self, mods, ops):
        return lambda th: None

    op_membar = op_fence

    def op_griddepcontrol(self, mods, ops):
        """launch_dependents: nothing to model (a dependent launch starts when launched, below);
        wait: the thread waits until the prior grid has completed (Launch.resume)."""
        if mods[0] == "wait":
            return None, ("gridwait", None, None)
        return lambda th: None

    # -- integer arithmetic
    def _int3(self, mods, ops, fn):
        t = mods[-1]
        w = width_of(t)
        signed = t.startswith("s")
        d, *srcs = ops
        getters = [self.src(s, t) for s in srcs]
        put = self.dst(d)
        if signed:
            def f(th):
                put(th, fn(*[to_signed(g(th), w) for g in getters]))
        else:
            def f(th):
                put(th, fn(*[g(th) for g in getters]))
        return f

    def _float_or_int(self, mods, ops, float_fn, int_fn=None):
        """float_fn for a float type (f16, bf16, f32, f64 and the x2 pairs), else int_fn."""
        if mods[-1].startswith(("f", "bf")):
            return self._float_op(mods, ops, float_fn)
        return self._int3(mods, ops, int_fn or float_fn)

    def op_add(self, mods, ops):
        return self._float_or_int(mods, ops, lambda a, b: a + b)

    def op_sub(self, mods, ops):
        return self._float_or_int(mods, ops, lambda a, b: a - b)

    def op_mul(self, mods, ops):
        t = mods[-1]
        if t.startswith("f") or t.startswith("bf"):
            return self._float_op(mods, ops, lambda a, b: a * b)
        w = width_of(t)
        signed = t.startswith("s")
        d, a, b = ops
        ga, gb, put = self.src(a, t), self.src(b, t), self.dst(d)
        conv = (lambda v: to_signed(v, w)) if signed else (lambda v: v)
        if "wide" in mods:
            return lambda th: put(th, conv(ga(th)) * conv(gb(th)))
        if "hi" in mods:
            return lambda th: put(th, (conv(ga(th)) * conv(gb(th))) >> w)
        return lambda th: put(th, conv(ga(th)) * conv(gb(th)))

    def op_mad(self, mods, ops):
        t = mods[-1]
        if t.startswith("f"):
            return self.op_fma(mods, ops)
        w = width_of(t)
        signed = t.startswith("s")
        d, a, b, c = ops
        ga, gb = self.src(a, t), self.src(b, t)
        ct = ("s" if signed else "u") + str(2 * w) if "wide" in mods else t
        gc, put = self.src(c, ct), self.dst(d)
        conv = (lambda v: to_signed(v, w)) if signed else (lambda v: v)
        cw = 2 * w if "wide" in mods else w
        convc = (lambda v: to_signed(v, cw)) if signed else (lambda v: v)
        if "hi" in mods:
            return lambda th: put(th, ((conv(ga(th)) * conv(gb(th))) >> w) + convc(gc(th)))
        return lambda th: put(th, conv(ga(th)) * conv(gb(th)) + convc(gc(th)))

    def op_div(self, mods, ops):
        t = mods[-1]
        if t.startswith("f"):
            return self._float_op(mods, ops, _fdiv)
        def div(a, b):
            if b == 0:
                return -1
            q = abs(a) // abs(b)
            return q if (a >= 0) == (b >= 0) else -q
        return self._int3(mods, ops, div)

    def op_rem(self, mods, ops):
        def rem(a, b):
            if b == 0:
                return a
            r = abs(a) % abs(b)
            return r if a >= 0 else -r
        return self._int3(mods, ops, rem)

    def op_min(self, mods, ops):
        return self._float_or_int(mods, ops, _fmin, min)

    def op_max(self, mods, ops):
        return self._float_or_int(mods, ops, _fmax, max)

    def op_abs(self, mods, ops):
        return self._float_or_int(mods, ops, abs)

    def op_neg(self, mods, ops):
        return self._float_or_int(mods, ops, lambda a: -a)

    def op_and(self, mods, ops):
        return self._int3(mods, ops, lambda a, b: a & b)

    def op_or(self, mods, ops):
        return self._int3(mods, ops, lambda a, b: a | b)

    def op_xor(self, mods, ops):
        return self._int3(mods, ops, lambda a, b: a ^ b)

    def op_not(self, mods, ops):
        return self._int3(mods, ops, lambda a: ~a)

    def op_cnot(self, mods, ops):
        return self._int3(mods, ops, lambda a: int(a == 0))

    def op_popc(self, mods, ops):
        t = mods[-1]
        d, a = ops
        g, put = self.src(a, t), self.dst(d)
        return lambda th: put(th, bin(g(th)).count("1"))

    def op_clz(self, mods, ops):
        t = mods[-1]
        w = width_of(t)
        d, a = ops
        g, put = self.src(a, t), self.dst(d)
        return lambda th: put(th, w - g(th).bit_length())

    def op_brev(self, mods, ops):
        t = mods[-1]
        w = width_of(t)
        d, a = ops
        g, put = self.src(a, t), self.dst(d)
        return lambda th: put(th, int(format(g(th), f"0{w}b")[::-1], 2))

    def _shift(self, mods, ops, left):
        t = mods[-1]
        w = width_of(t)
        signed = t.startswith("s")
        d, a, b = ops
        ga, gb, put = self.src(a, t), self.src(b, "u32"), self.dst(d)
        if left:
            return lambda th: put(th, ga(th) << min(gb(th), w))
        if signed:
            return lambda th: put(th, to_signed(ga(th), w) >> min(gb(th), w))
        return lambda th: put(th, ga(th) >> min(gb(th), w))

    def op_shl(self, mods, ops):
        return self._shift(mods, ops, True)

    def op_shr(self, mods, ops):
        return self._shift(mods, ops, False)

    def op_bfe(self, mods, ops):
        t = mods[-1]
        w = width_of(t)
        signed = t.startswith("s")
        d, a, b, c = ops
        ga, gb, gc, put = self.src(a, t), self.src(b, "u32"), self.src(c, "u32"), self.dst(d)
        def f(th):
            pos, ln = gb(th) & 0xFF, gc(th) & 0xFF
            v = ga(th)
            if ln == 0:
                put(th, 0)
                return
            sbit = (v >> min(pos + ln - 1, w - 1)) & 1 if signed else 0
            field = 0
            for i in range(min(ln, w)):
                field |= ((v >> (pos + i)) & 1 if pos + i < w else sbit) << i
            put(th, field - (1 << ln) if signed and sbit else field)
        return f

    def op_bfi(self, mods, ops):
        t = mods[-1]
        d, a, b, c, e = ops
        ga, gb, gc, ge, put = self.src(a, t), self.src(b, t), self.src(c, "u32"), self.src(e, "u32"), self.dst(d)
        def f(th):
            pos, ln = gc(th) & 0xFF, ge(th) & 0xFF
            m = ((1 << ln) - 1) << pos
            put(th, (gb(th) & ~m) | ((ga(th) << pos) & m))
        return f

    def op_prmt(self, mods, ops):
        d, a, b, c = ops
        ga, gb, gc, put = self.src(a, "b32"), self.src(b, "b32"), self.src(c, "b32"), self.dst(d)
        if len(mods) > 1 and mods[1] not in ("b32",):
            raise NotImplementedError("prmt mode " + mods[1])
        def f(th):
            src = ga(th) | (gb(th) << 32)
            sel = gc(th)
            out = 0
            for i in range(4):
                s = (sel >> (4 * i)) & 0xF
                byte = (src >> (8 * (s & 7))) & 0xFF
                if s & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
            put(th, out)
        return f

    def op_selp(self, mods, ops):
        t = mods[-1]
        d, a, b, c = ops
        ga, gb, gc, put = self.src(a, t), self.src(b, t), self.src(c, "pred"), self.dst(d)
        return lambda th: put(th, ga(th) if gc(th) else gb(th))

    def op_setp(self, mods, ops):
        cmp, t = mods[0], mods[-1]
        combine = next((m for m in mods[1:-1] if m in ("and", "or", "xor")), None)
        d = ops[0]
        pd, _, qd = d.partition("|")
        a, b = ops[1], ops[2]
        gc = self.src(ops[3], "pred") if combine else None
        test = self._compare(cmp, t, "ftz" in mods)
        ga, gb = self.src(a, t), self.src(b, t)
        put_p, put_q = self.dst(pd.strip()), self.dst(qd.strip()) if qd else None
        def f(th):
            r = test(ga(th), gb(th))
            q = not r
            if combine:
                c = gc(th)
                r, q = ({"and": lambda x: x and c, "or": lambda x: x or c, "xor": lambda x: x != bool(c)}[combine](x)
                        for x in (r, q))
            put_p(th, int(bool(r)))
            if put_q:
                put_q(th, int(bool(q)))
        return f

    def _compare(self, cmp, t, flush):
        if t.startswith("f") or t.startswith("bf"):
            fl = Float(t, flush)
            base = {"eq": lambda x, y: x == y, "ne": lambda x, y: x != y and not (math.isnan(x) or math.isnan(y)),
                    "lt": lambda x, y: x < y, "le": lambda x, y: x <= y, "gt": lambda x, y: x > y,
                    "ge": lambda x, y: x >= y, "num": lambda x, y: not (math.isnan(x) or math.isnan(y)),
                    "nan": lambda x, y: math.isnan(x) or math.isnan(y)}
            if cmp in base:
                fn = base[cmp]
            else:  # equ, neu, ltu, leu, gtu, geu: true when either is NaN
                ordered = {"equ": "eq", "neu": "ne", "ltu": "lt", "leu": "le", "gtu": "gt", "geu": "ge"}[cmp]
                inner = base[ordered] if ordered != "ne" else (lambda x, y: x != y)
                fn = lambda x, y: math.isnan(x) or math.isnan(y) or inner(x, y)
            return lambda a, b: fn(fl.get(a), fl.get(b))
        w = width_of(t)
        signed = t.startswith("s")
        conv = (lambda v: to_signed(v, w)) if signed else (lambda v: v)
        fn = {"eq": lambda x, y: x == y, "ne": lambda x, y: x != y, "lt": lambda x, y: x < y,
              "le": lambda x, y: x <= y, "gt": lambda x, y: x > y, "ge": lambda x, y: x >= y,
              "lo": lambda x, y: x < y, "ls": lambda x, y: x <= y, "hi": lambda x, y: x > y,
              "hs": lambda x, y: x >= y}[cmp]
        if cmp in ("lo", "ls", "hi", "hs"):
            return fn
        return lambda a, b: fn(conv(a), conv(b))

    def op_cvt(self, mods, ops):
        dt, st = mods[-2], mods[-1]
        flush = "ftz" in mods
        sat = "sat" in mods
        rnd = next((m for m in mods if m in ("rn", "rz", "rm", "rp", "rni", "rzi", "rmi", "rpi", "rna", "rs")), None)
        d, *srcs = ops
        put = self.dst(d)
        if dt.endswith("x2"):  # cvt.rn.bf16x2.f32 d, a, b: d = {hi: a, lo: b}
            half = dt[:-2]
            enc = Float(half, False).put
            dec = Float(st, flush).get
            ga, gb = self.src(srcs[0], st), self.src(srcs[1], st)
            return lambda th: put(th, (enc(dec(ga(th))) << 16) | enc(dec(gb(th))))
        g = self.src(srcs[0], st)
        s_float = st.startswith("f") or st.startswith("bf")
        d_float = dt.startswith("f") or dt.startswith("bf")
        if rnd in ("rz", "rm", "rp") and (s_float or dt != "f32"):
            raise NotImplementedError(f"cvt.{rnd}.{dt}.{st} is not modelled")
        sw, dw = width_of(st), width_of(dt)
        if s_float:
            dec = Float(st, flush).get
        if d_float:
            enc_f = Float(dt, flush and dt == "f32")
        def get_value(th):
            v = g(th)
            if s_float:
                return dec(v)
            return to_signed(v, sw) if st.startswith("s") else v
        if d_float:
            def f(th):
                x = get_value(th)
                if isinstance(x, float) and rnd in ("rni", "rzi", "rmi", "rpi") and math.isfinite(x):
                    r = {"rni": _round_half_even, "rzi": math.trunc, "rmi": math.floor, "rpi": math.ceil}[rnd](x)
                    x = math.copysign(float(r), x)
                elif not isinstance(x, float):
                    x = _int_to_float(x, 24 if dt == "f32" else 53)
                if dt == "f32" and not s_float and rnd in ("rz", "rm", "rp"):
                    x = _directed32(x, rnd)
                if sat:
                    x = 0.0 if math.isnan(x) else min(max(x, 0.0), 1.0)
                put(th, enc_f.put(x))
            return f
        signed = dt.startswith("s")
        lo, hi = (-(1 << (dw - 1)), (1 << (dw - 1)) - 1) if signed else (0, (1 << dw) - 1)
        if s_float:
            r = {"rni": _round_half_even, "rzi": math.trunc, "rmi": math.floor, "rpi": math.ceil, None: math.trunc}[rnd]
            def f(th):
                x = get_value(th)
                if math.isnan(x):
                    put(th, 0)
                    return
                if math.isinf(x):
                    put(th, hi if x > 0 else lo)
                    return
                put(th, min(max(int(r(x)), lo), hi))  # float to int saturates
            return f
        if sat:
            return lambda th: put(th, min(max(get_value(th), lo), hi))
        # to the destination type's width (then sign- or zero-extended into the register)
        if signed:
            return lambda th: put(th, to_signed(get_value(th), dw))
        return lambda th: put(th, get_value(th) & ((1 << dw) - 1))

    # -- floating point
    def _float_op(self, mods, ops, fn):
        t = mods[-1]
        flush = "ftz" in mods
        d, *srcs = ops
        if t.endswith("x2"):
            half = Float(t[:-2], False)
            getters = [self.src(s, "b32") for s in srcs]
            put = self.dst(d)
            def f(th):
                vals = [g(th) for g in getters]
                lo = half.put(_round32(fn(*[half.get(v) for v in vals])))
                hi = half.put(_round32(fn(*[half.get(v >> 16) for v in vals])))
                put(th, lo | (hi << 16))
            return f
        fl = Float(t, flush)
        getters = [self.src(s, t) for s in srcs]
        put = self.dst(d)
        get = fl.get
        enc = fl.put
        if len(getters) == 1:
            g0 = getters[0]
            return lambda th: put(th, enc(fn(get(g0(th)))))
        if len(getters) == 2:
            g0, g1 = getters
            return lambda th: put(th, enc(fn(get(g0(th)), get(g1(th)))))
        return lambda th: put(th, enc(fn(*[get(g(th)) for g in getters])))

    def op_fma(self, mods, ops):
        return self._float_op(mods, ops, lambda a, b, c: a * b + c)

    def op_copysign(self, mods, ops):  # copysign d, a, b: |b| with a's sign
        return self._float_op(mods, ops, lambda a, b: math.copysign(b, a))

    def op_rcp(self, mods, ops):
        return self._float_op(mods, ops, lambda a: _fdiv(1.0, a))

    def op_sqrt(self, mods, ops):
        return self._float_op(mods, ops, lambda a: math.sqrt(a) if a >= 0 else (a if a == 0 else math.nan))

    def op_rsqrt(self, mods, ops):
        return self._float_op(mods, ops, lambda a: (math.copysign(math.inf, a) if a == 0
                                                    else (1 / math.sqrt(a) if a > 0 else math.nan)))

    def op_ex2(self, mods, ops):
        return self._float_op(mods, ops, lambda a: _exp2(a))

    def op_lg2(self, mods, ops):
        return self._float_op(mods, ops, lambda a: math.log2(a) if a > 0 else (-math.inf if a == 0 else math.nan))

    def op_tanh(self, mods, ops):
        return self._float_op(mods, ops, math.tanh)

    def op_sin(self, mods, ops):
        return self._float_op(mods, ops, math.sin)

    def op_cos(self, mods, ops):
        return self._float_op(mods, ops, math.cos)

    def op_testp(self, mods, ops):
        kind, t = mods[0], mods[-1]
        d, a = ops
        fl = Float(t, False)
        g, put = self.src(a, t), self.dst(d)
        test = {"finite": math.isfinite, "infinite": math.isinf, "number": lambda x: not math.isnan(x),
                "notanumber": math.isnan, "normal": lambda x: math.isfinite(x) and abs(x) >= FLT_MIN,
                "subnormal": lambda x: x != 0 and abs(x) < FLT_MIN}[kind]
        return lambda th: put(th, int(test(fl.get(g(th)))))

    # -- control
    def op_bra(self, mods, ops):
        target = self.labels[ops[0]]
        def f(th):
            th.pc = target
        return f

    def op_ret(self, mods, ops):
        def f(th):
            th.done = True
        return f

    op_exit = op_ret

    def op_trap(self, mods, ops):
        def f(th):
            raise DeviceAssert(f"trap in thread {th.tid} of CTA {th.cta.ctaid}")
        return f

    def op_call(self, mods, ops):
        target = ops[0].strip()
        if target.startswith("("):  # call (retval), func, (args)
            target = ops[1].strip()
        if target == "__assertfail":
            def f(th):
                where = f"device-side assert in thread {th.tid} of CTA {th.cta.ctaid}"
                if not th.cta.launch.record_asserts:
                    raise DeviceAssert(where)
                th.cta.launch.asserts.append(where)
            return f
        if target == "vprintf":
            return lambda th: None
        raise NotImplementedError(f"call to {target}")

    # -- warp and CTA collectives: resolved by the scheduler
    def op_bar(self, mods, ops):
        if mods and mods[0] == "warp":  # bar.warp.sync mask
            g = self.src(ops[0], "b32")
            return None, ("warpsync", g, None)
        spec = dict(count=None, reduce=None)
        if mods and mods[0] == "red":  # bar.red.OP.pred d, id, [count,] a: the CTA's OR / AND of a
            d, *rest = ops
            a = rest.pop()
            spec["reduce"] = (mods[1], self.src(a.lstrip("!"), "pred"), a.startswith("!"), self.dst(d))
            ops = rest
        if len(ops) > 1:  # a thread count: a barrier of some warps, whose epochs are not modelled
            raise NotImplementedError(f"bar with a thread count: {' '.join(mods)} {ops}")
        return None, ("bar", self.src(ops[0], "u32"), spec)

    op_barrier = op_bar

    def op_shfl(self, mods, ops):
        mode = mods[1]  # shfl.sync.MODE.b32
        d, a, b, c, mask = ops
        dd, _, pd = d.partition("|")
        spec = dict(mode=mode, a=self.src(a, "b32"), b=self.src(b, "b32"), c=self.src(c, "b32"),
                    put=self.dst(dd.strip()), putp=self.dst(pd.strip()) if pd else None)
        return None, ("shfl", self.src(mask, "b32"), spec)

    def op_vote(self, mods, ops):
        mode = mods[1]  # vote.sync.MODE.pred / .b32
        d, a, mask = ops
        neg = a.startswith("!")
        spec = dict(mode=mode, a=self.src(a.lstrip("!"), "pred"), neg=neg, put=self.dst(d))
        return None, ("vote", self.src(mask, "b32"), spec)

    def op_cp(self, mods, ops):
        """cp.async.{ca,cg}.shared.global [dst], [src], size[, src_size]: the source is read now and
        lands in shared memory when a cp.async.wait_group retires its group (reads of it before
        then are races); bytes past src_size are zeros. commit_group / wait_group / wait_all."""
        kind = mods[1]
        if kind == "commit_group":
            return lambda th: th.async_groups.append(th.async_open) or setattr(th, "async_open", [])
        if kind in ("wait_group", "wait_all"):
            keep = int(ops[0]) if kind == "wait_group" else 0
            def wait(th):
                if kind == "wait_all":
                    th.async_groups.append(th.async_open)
                    th.async_open = []
                while len(th.async_groups) > keep:
                    for dst, data in th.async_groups.pop(0):
                        th.cta.smem.land(dst, data, th)
            return wait
        dst_text, src_text, size_text, *rest = ops
        dst, src = self.address(dst_text), self.address(src_text)
        size = int(size_text, 0)
        src_size = self.src(rest[0], "u32") if rest else (lambda th: size)
        def copy(th):
            n = min(src_size(th), size)
            source, address = src(th), th._resolve("shared", dst(th))[1]
            _check_aligned("global", source, size, th)
            _check_aligned("shared", address, size, th)
            data = (th.cta.launch.mem.read(source, n) if n else b"") + bytes(size - n)
            th.cta.smem.reserve(address, size, th)
            th.async_open.append((address, data))
        return copy

    def op_ldmatrix(self, mods, ops):
        """ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8i..8i+7 give the rows of matrix
        i; lane l gets row l/4, columns 2(l%4) and 2(l%4)+1 of each (transposed: column l/4, rows
        2(l%4) and 2(l%4)+1), the lower column (row) in the lower half."""
        count = int(next(m for m in mods if m.startswith("x"))[1:])
        d, a = ops
        names = [x.strip() for x in d[1:-1].split(",")] if d.startswith("{") else [d]
        spec = dict(count=count, trans="trans" in mods, addr=self.address(a), puts=[self.dst(n) for n in names])
        return None, ("ldmatrix", lambda th: 0xFFFFFFFF, spec)

    def op_mma(self, mods, ops):
        """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A B + C with g =
        lane / 4, t = lane % 4: a0..a3 = A[g][2t:2t+2], A[g+8][2t:], A[g][2t+8:], A[g+8][2t+8:];
        b0, b1 = B[2t:2t+2][g], B[2t+8:2t+10][g]; c0..c3 = C[g][2t], C[g][2t+1], C[g+8][2t],
        C[g+8][2t+1]. Products exact, their sum with C in float64, rounded once to fp32."""
        if mods[2:6] != ["m16n8k16", "row", "col", "f32"] or mods[-1] != "f32" or mods[6] != mods[7]:
            raise NotImplementedError("mma." + ".".join(mods))
        halves = {"f16": lambda u: u.astype(np.uint16).view(np.float16).astype(np.float64),
                  "bf16": lambda u: (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)}[mods[6]]
        regs = [[x.strip() for x in o[1:-1].split(",")] for o in ops]
        spec = dict(halves=halves, a=[self.src(r, "b32") for r in regs[1]], b=[self.src(r, "b32") for r in regs[2]],
                    c=[self.src(r, "f32") for r in regs[3]], d=[self.dst(r) for r in regs[0]])
        return None, ("mma", lambda th: 0xFFFFFFFF, spec)

    def op_activemask(self, mods, ops):
        put = self.dst(ops[0])
        return None, ("activemask", lambda th: 0xFFFFFFFF, dict(put=put))


def _fdiv(a, b):
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _exp2(a):
    try:
        return 2.0 ** a
    except OverflowError:
        return math.inf


def _ignoring_nan(pick):
    """min/max.f32: a NaN operand gives the other one."""
    return lambda a, b: b if math.isnan(a) else a if math.isnan(b) else pick(a, b)


_fmin, _fmax = _ignoring_nan(min), _ignoring_nan(max)


def _int_to_float(v, bits):
    """An integer rounded once (to nearest even) to `bits` significant bits, as a float."""
    n = abs(v)
    if n.bit_length() <= bits:
        return float(v)
    shift = n.bit_length() - bits
    q, r = divmod(n, 1 << shift)
    half = 1 << (shift - 1)
    if r > half or (r == half and q & 1):
        q += 1
    return math.copysign(math.ldexp(q, shift), v)


def _round_half_even(x):
    return round(x)


def _directed32(x, mode):
    r = _round32(x)
    if r == x:
        return r
    up = np.nextafter(np.float32(r), np.float32(np.inf))
    down = np.nextafter(np.float32(r), np.float32(-np.inf))
    if mode == "rz":
        return float(r) if abs(r) <= abs(x) else float(down if x > 0 else up)
    if mode == "rm":
        return float(r) if r <= x else float(down)
    return float(r) if r >= x else float(up)


# ---- Running ------------------------------------------------------------------------------------------------

# mma.m16n8k16's fragments by lane (g = lane / 4, t = lane % 4): each A register's first element
# (row, column), each B register's first row (column g), each C / D element (row, column).
_LANES = np.arange(32)
_G, _T = _LANES // 4, _LANES % 4
_MMA_A = [(_G, 2 * _T), (_G + 8, 2 * _T), (_G, 2 * _T + 8), (_G + 8, 2 * _T + 8)]
_MMA_B = [2 * _T, 2 * _T + 8]
_MMA_C = [(_G, 2 * _T), (_G, 2 * _T + 1), (_G + 8, 2 * _T), (_G + 8, 2 * _T + 1)]


class Warp:
    def __init__(self):
        self.epoch = 0


class Thread:
    __slots__ = ("tid", "tidxyz", "r", "pc", "done", "wait", "cta", "warp", "local", "lane", "async_groups",
                 "async_open")

    def __init__(self, cta, tid, tidxyz, local_size):
        self.tid, self.tidxyz, self.cta = tid, tidxyz, cta
        self.lane = tid % 32
        self.warp = cta.warps[tid // 32]
        self.r, self.pc, self.done, self.wait = {}, 0, False, None
        self.local = bytearray(b"\xff" * local_size)  # never written: all ones, as registers
        self.async_groups, self.async_open = [], []

    def special(self, name):
        c = self.cta
        if name.startswith("%tid."):
            return self.tidxyz["xyz".index(name[-1])]
        if name.startswith("%ntid."):
            return c.block["xyz".index(name[-1])]
        if name.startswith("%ctaid."):
            return c.ctaid["xyz".index(name[-1])]
        if name.startswith("%nctaid."):
            return c.grid["xyz".index(name[-1])]
        if name == "%laneid":
            return self.lane
        if name == "%warpid":
            return self.tid // 32
        if name == "%nwarpid":
            return len(c.warps)
        if name in ("%smid",):
            return 0
        if name == "%nsmid":
            return 1
        lane = self.lane
        return {"%lanemask_lt": (1 << lane) - 1, "%lanemask_le": (1 << (lane + 1)) - 1, "%lanemask_eq": 1 << lane,
                "%lanemask_gt": (0xFFFFFFFF << (lane + 1)) & 0xFFFFFFFF,
                "%lanemask_ge": (0xFFFFFFFF << lane) & 0xFFFFFFFF}[name]

    def _resolve(self, space, address):
        if space == "generic":
            if SHARED_WINDOW <= address < SHARED_WINDOW + (1 << 32):
                return "shared", address - SHARED_WINDOW
            if LOCAL_WINDOW <= address < LOCAL_WINDOW + (1 << 32):
                return "local", address - LOCAL_WINDOW
            if PARAM_WINDOW <= address < PARAM_WINDOW + (1 << 32):
                return "param", address - PARAM_WINDOW
            return "global", address
        if space == "param" and address >= PARAM_WINDOW:  # a kernel parameter's symbol
            return "param", address - PARAM_WINDOW
        if space in ("shared", "local") and address >= GLOBAL_BASE:
            raise MemoryFault(f"a .{space} access at {address:#x}: a generic address where the instruction takes a "
                              f".{space} one (thread {self.tid})")
        return space, address

    def load(self, space, address, size, non_coherent=False):
        space, address = self._resolve(space, address)
        _check_aligned(space, address, size, self)
        if space in ("global", "const"):
            if non_coherent:
                self.cta.launch.mem.check_unwritten(address, size, self.cta.launch.written)
            return self.cta.launch.mem.read(address, size)
        if space == "shared":
            return self.cta.smem.read(address, size, self)
        if space == "param":
            p = self.cta.launch.params
            if address < 0 or address + size > len(p):
                raise MemoryFault(f"param read at {address} past the kernel's {len(p)} bytes")
            return bytes(p[address: address + size])
        if address < 0 or address + size > len(self.local):
            raise MemoryFault(f"local access at {address} past the thread's {len(self.local)} bytes")
        return bytes(self.local[address: address + size])

    def store(self, space, address, data):
        space, address = self._resolve(space, address)
        _check_aligned(space, address, len(data), self)
        if space == "global":
            self.cta.launch.mem.write(address, data, self.cta.launch.written)
        elif space == "shared":
            self.cta.smem.write(address, data, self)
        elif space == "local" or space == "param":
            if address < 0 or address + len(data) > len(self.local):
                if space == "param":
                    return  # a call sequence's arguments (__assertfail's): nothing reads them
                raise MemoryFault(f"local access at {address} past the thread's {len(self.local)} bytes")
            self.local[address: address + len(data)] = data
        else:
            raise MemoryFault(f"store to {space} space")


def _check_aligned(space, address, size, th):
    """An access of `size` bytes (a vector's whole size) must be aligned to it, as on the GPU."""
    if address % size:
        raise MemoryFault(f"misaligned {size}-byte .{space} access at {address:#x} (thread {th.tid} of CTA "
                          f"{th.cta.ctaid})")


class CTA:
    def __init__(self, launch, ctaid):
        self.launch, self.ctaid = launch, ctaid
        self.grid, self.block = launch.grid, launch.block
        bx, by, bz = self.block
        n = bx * by * bz
        self.warps = [Warp() for _ in range((n + 31) // 32)]
        self.smem = SharedMemory(launch.shared_bytes)
        self.threads = [Thread(self, i, (i % bx, (i // bx) % by, i // (bx * by)), launch.local_bytes) for i in range(n)]


class Launch:
    def __init__(self, kernel, code, collective, mem, params, grid, block, shared_bytes, local_bytes, max_steps,
                 record_asserts, dependent):
        self.kernel, self.code, self.collective = kernel, code, collective
        self.mem, self.params = mem, params
        self.grid, self.block = grid, block
        self.shared_bytes, self.local_bytes = shared_bytes, local_bytes
        self.max_steps = max_steps
        self.steps = 0
        self.record_asserts, self.asserts = record_asserts, []
        self.prior_done = not dependent  # a dependent launch's CTAs wait at griddepcontrol.wait until resume()
        self.written = {}  # global buffer -> the bytes this launch wrote (ld.global.nc's check)

    def run(self, ctas=None):
        """Every CTA to its end or, in a dependent launch, up to its griddepcontrol.wait (kept in
        `paused` for resume())."""
        gx, gy, gz = self.grid
        order = ctas if ctas is not None else [(x, y, z) for z in range(gz) for y in range(gy) for x in range(gx)]
        self.paused = [cta for cta in (CTA(self, ctaid) for ctaid in order) if not self.run_cta(cta)]

    def resume(self):
        """The prior grid has completed: its writes are visible, every CTA goes on past its wait."""
        self.prior_done = True
        for cta in self.paused:
            assert self.run_cta(cta)
        self.paused = []

    def run_thread(self, th):
        code, coll = self.code, self.collective
        steps = 0
        while not th.done:
            pc = th.pc
            c = coll[pc]
            if c is not None:
                th.wait = c
                break
            th.pc = pc + 1
            code[pc](th)
            steps += 1
        self.steps += steps
        if self.steps > self.max_steps:
            raise Deadlock(f"more than {self.max_steps} instructions: an endless loop?")

    def run_cta(self, cta):
        threads = cta.threads
        while True:
            for th in threads:
                if not th.done and th.wait is None:
                    self.run_thread(th)
            live = [th for th in threads if not th.done]
            if not live:
                return True
            progressed = False
            at_gridwait = [th for th in live if th.wait is not None and th.wait[0][0] == "gridwait"]
            if at_gridwait and self.prior_done:
                for th in at_gridwait:
                    th.wait, th.pc = None, th.pc + 1
                continue
            # warp collectives, per warp and instruction
            for w in range(len(cta.warps)):
                lanes = threads[32 * w: 32 * w + 32]
                waiting = {}
                for th in lanes:
                    if not th.done and th.wait is not None and th.wait[0][0] not in ("bar", "gridwait"):
                        waiting.setdefault(th.pc, []).append(th)
                for pc, group in waiting.items():
                    (kind, gmask, spec), neg, pname = group[0].wait
                    active = [th for th in group if pname is None or (th.r.get(pname, 1) ^ neg)]
                    skipped = [th for th in group if th not in active]
                    for th in skipped:
                        th.wait, th.pc = None, th.pc + 1
                        progressed = True
                    if not active:
                        continue
                    masks = {gmask(th) for th in active}
                    if len(masks) != 1:
                        raise Deadlock(f"lanes of warp {w} disagree on the member mask at pc {pc}: {masks}")
                    mask = masks.pop()
                    members = [th for th in lanes if (mask >> th.lane) & 1]
                    here = {th.lane for th in active}
                    missing = [th for th in members if th.lane not in here]
                    if any(th.done for th in missing):
                        raise Deadlock(f"warp {w}: a {kind} at pc {pc} names exited lanes in its mask {mask:#x}")
                    if missing:
                        continue  # the others are still on their way (or waiting elsewhere)
                    extra = [th for th in active if not (mask >> th.lane) & 1]
                    if extra:
                        raise Deadlock(f"warp {w}: lanes {[t.lane for t in extra]} at a {kind} outside its mask")
                    self.collective_op(kind, spec, active)
                    if kind == "warpsync":  # __syncwarp orders the warp's memory; shuffles do not
                        cta.warps[w].epoch += 1
                    for th in active:
                        th.wait, th.pc = None, th.pc + 1
                    progressed = True
            # CTA barriers
            at_bar = [th for th in live if th.wait is not None and th.wait[0][0] == "bar"]
            if at_bar and not progressed:
                ids = {th.wait[0][1](th) for th in at_bar}
                for bid in ids:
                    group = [th for th in at_bar if th.wait[0][1](th) == bid]
                    spec = group[0].wait[0][2]
                    gcount = spec["count"]
                    need = gcount(group[0]) if gcount else len(cta.threads)
                    exited = sum(th.done for th in threads) if not gcount else 0
                    if len(group) + exited >= need and (gcount or len(group) == len(live)):
                        if len({th.pc for th in group}) > 1:
                            raise Deadlock(f"CTA {cta.ctaid}: barrier {bid} reached at different instructions "
                                           f"{sorted({th.pc for th in group})} (bar.sync is .aligned)")
                        cta.smem.cta_epoch += 1
                        if spec["reduce"]:
                            op, get, neg, put = spec["reduce"]
                            votes = [bool(get(th)) ^ neg for th in group]
                            result = {"or": any(votes), "and": all(votes), "popc": sum(votes)}[op]
                            for th in group:
                                put(th, int(result))
                        for th in group:
                            th.wait, th.pc = None, th.pc + 1
                        progressed = True
            if not progressed and at_gridwait:
                return False  # paused (with any threads that wait at a barrier for these) until resume()
            if not progressed:
                places = sorted({(th.pc, th.wait[0][0]) for th in live})
                raise Deadlock(f"CTA {cta.ctaid}: {len(live)} live threads wait at {places}")

    def collective_op(self, kind, spec, group):
        if kind in ("warpsync",):
            return
        if len(group) == 32 and kind == "ldmatrix":
            rows = []
            for th in group[:8 * spec["count"]]:
                address = th._resolve("shared", spec["addr"](th))[1]
                _check_aligned("shared", address, 16, th)
                rows.append(th.cta.smem.read(address, 16, th))
            for i in range(spec["count"]):
                m = [[int.from_bytes(rows[8 * i + r][2 * c: 2 * c + 2], "little") for c in range(8)] for r in range(8)]
                if spec["trans"]:
                    m = [list(col) for col in zip(*m)]
                for th in group:
                    r, c = th.lane // 4, 2 * (th.lane % 4)
                    spec["puts"][i](th, m[r][c] | (m[r][c + 1] << 16))
            return
        if len(group) == 32 and kind == "mma":
            a = np.array([[f(th) for f in spec["a"]] for th in group], np.uint32)  # [lane, a0..a3]
            b = np.array([[f(th) for f in spec["b"]] for th in group], np.uint32)
            c = np.array([[f(th) for f in spec["c"]] for th in group], np.uint32).view(np.float32)
            A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
            for i, (row, col) in enumerate(_MMA_A):
                A[row, col], A[row, col + 1] = spec["halves"](a[:, i] & 0xFFFF), spec["halves"](a[:, i] >> 16)
            for i, row in enumerate(_MMA_B):
                B[row, _G], B[row + 1, _G] = spec["halves"](b[:, i] & 0xFFFF), spec["halves"](b[:, i] >> 16)
            for i, (row, col) in enumerate(_MMA_C):
                C[row, col] = c[:, i]
            D = (A @ B + C).astype(np.float32).view(np.uint32)
            for th in group:
                for put, (row, col) in zip(spec["d"], _MMA_C):
                    put(th, int(D[row[th.lane], col[th.lane]]))
            return
        if kind in ("ldmatrix", "mma"):
            raise Deadlock(f"{kind} with {len(group)} lanes: it takes the whole warp")
        if kind == "activemask":
            mask = sum(1 << th.lane for th in group)
            for th in group:
                spec["put"](th, mask)
            return
        by_lane = {th.lane: th for th in group}
        if kind == "vote":
            vals = {th.lane: bool(spec["a"](th)) ^ spec["neg"] for th in group}
            mode = spec["mode"]
            ballot = sum(1 << l for l, v in vals.items() if v)
            result = {"all": int(all(vals.values())), "any": int(any(vals.values())),
                      "uni": int(len(set(vals.values())) == 1), "ballot": ballot}[mode]
            for th in group:
                spec["put"](th, result)
            return
        # shfl.sync
        mode = spec["mode"]
        values = {th.lane: spec["a"](th) for th in group}
        results = []
        for th in group:
            lane, b, c = th.lane, spec["b"](th) & 0x1F, spec["c"](th)
            clamp, segmask = c & 0x1F, (c >> 8) & 0x1F
            min_lane = lane & segmask
            max_lane = min_lane | (clamp & ~segmask & 0x1F)
            if mode == "up":
                j, ok = lane - b, lane - b >= max_lane
            elif mode == "down":
                j, ok = lane + b, lane + b <= max_lane
            elif mode == "bfly":
                j, ok = lane ^ b, (lane ^ b) <= max_lane
            else:
                j = min_lane | (b & ~segmask & 0x1F)
                ok = j <= max_lane
            if not ok:
                j = lane
            if j not in by_lane:
                raise Deadlock(f"shfl.sync.{mode}: lane {lane} reads lane {j}, which is not in the mask")
            results.append((th, values[j], ok))
        for th, v, ok in results:
            spec["put"](th, v)
            if spec["putp"]:
                spec["putp"](th, int(ok))


def _lay_out(variables, symbols):
    """Offsets of (name, size, align) variables one after another, into symbols; their end."""
    offset = 0
    for name, size, align in variables:
        offset = (offset + align - 1) // align * align
        symbols[name] = offset
        offset += size
    return offset


class Program:
    """One kernel of a Module, compiled for launches."""

    def __init__(self, module: Module, name: str):
        self.module, self.kernel = module, module.kernel(name)
        k = self.kernel
        symbols = {}
        for p in k.params:
            symbols[p.name] = PARAM_WINDOW + p.offset
        offset = _lay_out(k.shared, symbols)
        if module.extern_shared:
            self.dynamic_offset = (offset + 15) // 16 * 16
            symbols[module.extern_shared] = self.dynamic_offset
        else:
            self.dynamic_offset = offset
        self.local_bytes = _lay_out(k.local, symbols)
        self.symbols = symbols
        self.globals = []
        address = MODULE_GLOBALS
        for gname, (raw, align) in module.globals.items():
            address = (address + 255) // 256 * 256
            symbols[gname] = address
            self.globals.append((address, raw, gname))
            address += len(raw) + 4096
        self.code = self.collective = None

    def launch(self, mem: DeviceMemory, params, grid, block, dynamic_shared=0, ctas=None, max_steps=5e8,
               record_asserts=False, dependent=False):
        """Runs the kernel over `grid` (or only the CTAs listed in `ctas`) with `block` threads.
        `params`: one bytes-like or int/float per kernel parameter (a struct by value as bytes of
        exactly its size). `dependent`: a programmatic dependent launch (PDL) made before its prior
        grid has run: each CTA runs up to its griddepcontrol.wait, and the returned launch's
        resume() runs the rest once the caller has run the prior grid; what a CTA reads before its
        wait is what memory held before the prior grid."""
        k = self.kernel
        for address, raw, gname in self.globals:
            mem.place(address, raw, gname)
        if self.code is None:
            self.code, self.collective = Compiler(k, self.symbols).compile()
        if len(params) != len(k.params):
            raise TypeError(f"{k.demangled}: {len(k.params)} parameters, {len(params)} given")
        blob = bytearray(k.param_size)
        for p, v in zip(k.params, params):
            if isinstance(v, (bytes, bytearray, memoryview)) or isinstance(v, ctypes.Structure):
                raw = bytes(v)
            elif isinstance(v, float):
                raw = struct.pack("<d" if p.type == "f64" else "<f", v)
            else:
                raw = (int(v) & ((1 << (8 * p.size)) - 1)).to_bytes(p.size, "little")
            if len(raw) != p.size:
                raise TypeError(f"{k.demangled}: parameter {p.name} takes {p.size} bytes, got {len(raw)}")
            blob[p.offset: p.offset + p.size] = raw
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        run = Launch(k, self.code, self.collective, mem, blob, grid, block, self.dynamic_offset + dynamic_shared,
                     self.local_bytes, int(max_steps), record_asserts, dependent)
        run.run(ctas)
        return run


def load(source_stem: str, library=None) -> Module:
    return Module(embedded_ptx(source_stem, library))
