"""llama_ext on torch.distributed, on gloo (CPU): 2 and 3 spawned processes.

* context-parallel ring attention against single-device ``gqa_attention``, forward and backward,
  causal and not, MHA/GQA/MQA, fp32 and bf16; the zigzag schedule against the dense causal mask;
* DTensor sharding rules: every op on sharded DTensors equals the op on the full tensors, with no
  communication, and unsupported placements raise;
* a ``patch_model``'ed tiny HF Llama: DDP, FSDP2 (fp32 and a bf16 mixed-precision policy) and
  context parallelism train with the losses and parameters of one process; tensor parallel (and
  sequence parallel) give one process's loss and gradients.

The processes are started once per world size and shared by the tests (imports dominate).
"""
import contextlib
import copy
import datetime
import os
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llama_ext
from llama_ext.distributed import (
    _ring_step_slices,
    context_parallel_attention,
    gather_from_context_parallel,
    ring_communication_bytes,
    shard_for_context_parallel,
)

from conftest import TOLERANCES, assert_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank, world, port, inbox, outbox):
    """A pool process: joins the gloo group once, then runs the functions the tests send."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=RUN_TIMEOUT_S))
    while True:  # until the pool terminates the process
        name, args = inbox.get()
        try:
            torch.manual_seed(0)
            globals()[name](rank, world, *args)
            outbox.put((rank, None))
        except BaseException:
            outbox.put((rank, traceback.format_exc()))


class _Pool:
    """``world`` gloo processes kept for the whole module: starting one (imports, above all
    transformers') costs far more than the tests run in it."""

    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        port = _free_port()
        self.processes = [
            ctx.Process(target=_serve, args=(rank, world, port, self.inboxes[rank], self.outbox), daemon=True)
            for rank in range(world)
        ]
        for p in self.processes:
            p.start()

    def run(self, fn, args):
        for inbox in self.inboxes:
            inbox.put((fn.__name__, args))
        errors, pending = [], self.world
        while pending:
            # Once one rank failed the others may wait in a collective for it: give them a moment.
            try:
                rank, error = self.outbox.get(timeout=30 if errors else RUN_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"{pending} rank(s) did not finish")
                break
            pending -= 1
            if error:
                errors.append(f"rank {rank}:\n{error}")
        if errors:
            self.close()
            raise AssertionError(f"{fn.__name__} failed on {self.world} processes:\n" + "\n".join(errors))

    def close(self):
        """Ends the processes; they hold nothing to save (a clean shutdown of torch takes seconds)."""
        _POOLS.pop(self.world, None)
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            p.join()


RUN_TIMEOUT_S = 900
_POOLS = {}


@pytest.fixture(scope="module", autouse=True)
def _close_pools():
    yield
    for pool in list(_POOLS.values()):
        pool.close()


def spawn(fn, world, *args):
    """Runs ``fn(rank, world, *args)`` (a function of this module) on ``world`` gloo processes;
    a failure on any rank raises here with its traceback."""
    if world not in _POOLS:
        _POOLS[world] = _Pool(world)
    _POOLS[world].run(fn, args)


@contextlib.contextmanager
def case(name):
    """Names the case in the failure of a worker's loop."""
    try:
        yield
    except AssertionError as e:
        e.add_note(f"case: {name}")
        raise


def assert_close_to_max(actual, expected, dtype, name="", scale=2.0):
    """|actual - expected| within the dtype's relative tolerance of expected's largest magnitude
    (gradients and updates: sums whose small elements carry absolute, not relative, error)."""
    bound = TOLERANCES[dtype]["rtol"] * scale * float(expected.abs().max()) + TOLERANCES[dtype]["atol"]
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _require_transformers():
    """In the test process, before spawning: CI installs transformers, so there a missing one fails."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("transformers", minversion="5.0", reason="needs transformers >= 5.0")


# ---- context-parallel attention ---------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_schedule_computes_exactly_the_unmasked_blocks(world):
    """For every rank and step, the (rows, keys, causal) call covers exactly the entries of the
    global causal mask between the rank's queries and the visiting block's keys."""
    chunk = 3
    seq = 2 * world * chunk
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    order = torch.arange(seq).view(2 * world, chunk)
    for rank in range(world):
        q_pos = torch.cat([order[rank], order[2 * world - 1 - rank]])
        for step in range(world):
            src = (rank - step) % world
            k_pos = torch.cat([order[src], order[2 * world - 1 - src]])
            needed = mask[q_pos][:, k_pos]
            rows, keys, causal = _ring_step_slices(step, rank, src, 2 * chunk, True)
            computed = torch.zeros_like(needed)
            block = torch.ones(2 * chunk, 2 * chunk, dtype=torch.bool)[rows, keys]
            computed[rows, keys] = block.tril(block.shape[1] - block.shape[0]) if causal else block
            assert torch.equal(computed, needed), (rank, step)
            # every rank and step does the same work: a causal (2c)^2 block or a full c x 2c one
            assert block.numel() // (2 if causal else 1) == 2 * chunk * chunk
            assert not causal or step == 0
            assert _ring_step_slices(step, rank, src, 2 * chunk, False) == (slice(0, 2 * chunk),) * 2 + (False,)


# (n_q_heads, n_kv_heads): MHA, GQA, MQA
HEADS = [(4, 4), (4, 2), (4, 1)]


def _ring_attention_cases(rank, world):
    seq = 64 * world  # 128 and 192 tokens
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (True, False):
            for n_q, n_kv in HEADS:
                g = torch.Generator().manual_seed(n_q * 10 + n_kv)
                q = torch.randn(2, seq, n_q, 32, generator=g).to(dtype)
                k = torch.randn(2, seq, n_kv, 32, generator=g).to(dtype)
                v = torch.randn(2, seq, n_kv, 32, generator=g).to(dtype)
                grad = torch.randn(2, seq, n_q, 32, generator=g).to(dtype)
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                expected = llama_ext.gqa_attention(*full, causal=causal)
                expected.backward(grad)

                local = [shard_for_context_parallel(t, 1).requires_grad_() for t in (q, k, v)]
                out = context_parallel_attention(*local, causal=causal)
                out.backward(shard_for_context_parallel(grad, 1))

                with case(f"{dtype} causal={causal} heads={n_q}/{n_kv}"):
                    assert_close(gather_from_context_parallel(out.detach(), 1), expected, dtype)
                    # Gradients sum a few more rounded terms than one device does.
                    for t, ref in zip(local, full):
                        assert_close(t.grad, shard_for_context_parallel(ref.grad, 1), dtype, scale=2.0)


def _ring_attention_worker(rank, world):
    _ring_attention_cases(rank, world)

    # shard/gather round trip, in sequence order, and the gather's gradient (each rank its slice)
    x = torch.arange(2 * 4 * world, dtype=torch.float32).view(2, 4 * world)
    local = shard_for_context_parallel(x, 1)
    chunk = x.shape[1] // (2 * world)
    assert torch.equal(local[:, :chunk], x[:, rank * chunk:(rank + 1) * chunk])
    assert torch.equal(local[:, chunk:], x[:, (2 * world - 1 - rank) * chunk:(2 * world - rank) * chunk])
    local.requires_grad_()
    gathered = gather_from_context_parallel(local, 1)
    assert torch.equal(gathered, x)
    (gathered * x).sum().backward()
    assert torch.equal(local.grad, shard_for_context_parallel(x, 1))

    # the volume ring_communication_bytes reports is what the ring sends
    sent, batch = [], dist.batch_isend_irecv

    def record(ops):
        sent.extend(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return batch(ops)

    dist.batch_isend_irecv = record
    try:
        q, k, v = (torch.randn(1, 8 * world, 2, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = context_parallel_attention(q, k, v)
        forward_bytes = sum(sent)
        out.backward(torch.ones_like(out))
    finally:
        dist.batch_isend_irecv = batch
    assert ring_communication_bytes(k, k, world) == {"forward": forward_bytes, "backward": sum(sent) - forward_bytes}

    # scale and a non-default head_dim pass through
    q, k, v = (torch.randn(1, 16 * world, 2, 24) for _ in range(3))
    out = context_parallel_attention(*(shard_for_context_parallel(t, 1) for t in (q, k, v)), scale=0.3)
    assert_close(gather_from_context_parallel(out, 1), llama_ext.gqa_attention(q, k, v, scale=0.3), torch.float32)

    # bad input
    with pytest.raises(ValueError, match="divisible by 2 \\* world_size"):
        shard_for_context_parallel(torch.randn(1, 2 * world + 1, 2, 8), 1)
    odd = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="even local sequence"):
        context_parallel_attention(odd, odd, odd)
    with pytest.raises(ValueError, match="share batch and local sequence"):
        context_parallel_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8))


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_attention_matches_single_device(world):
    spawn(_ring_attention_worker, world)


# ---- DTensor sharding rules ---------------------------------------------------------------------


@contextlib.contextmanager
def redistributions():
    """Records every input redistribution DTensor's dispatcher makes (collective or local)."""
    import torch.distributed.tensor._dispatch as dispatch

    calls, original = [], dispatch.redistribute_local_tensor

    def record(local, current_spec, target_spec, *args, **kwargs):
        calls.append(f"{current_spec.placements} -> {target_spec.placements}")
        return original(local, current_spec, target_spec, *args, **kwargs)

    dispatch.redistribute_local_tensor = record
    try:
        yield calls
    finally:
        dispatch.redistribute_local_tensor = original


def _dtensor_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))

    def dt(t, placement):
        return distribute_tensor(t.detach(), mesh, [placement]).requires_grad_(t.is_floating_point())

    def check(fn, tensors, placements, extra=()):
        """fn on DTensors placed as given == fn on the full tensors, forward and backward, and the
        ops themselves communicate nothing."""
        full = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors]
        expected = fn(*full, *extra)
        expected = expected if isinstance(expected, tuple) else (expected,)
        sum(e.float().sum() * (i + 1) for i, e in enumerate(expected)).backward()
        dts = [dt(t, p) for t, p in zip(tensors, placements)]
        with redistributions() as calls:
            got = fn(*dts, *extra)
        assert not calls, calls
        got = got if isinstance(got, tuple) else (got,)
        loss = sum(g.float().sum() * (i + 1) for i, g in enumerate(got))
        for g, e in zip(got, expected):
            assert_close(g.full_tensor(), e, torch.float32)
        loss.backward()  # the sum's all-reduce is the only communication of the backward
        for d, f in zip(dts, full):
            if f.grad is not None:
                assert_close(d.grad.full_tensor(), f.grad, torch.float32, scale=4.0)

    x, res, w = torch.randn(2, 6 * world, 32), torch.randn(2, 6 * world, 32), torch.randn(32)
    for dim in (0, 1):
        check(llama_ext.rms_norm, [x, w], [Shard(dim), Replicate()])
        check(llama_ext.fused_add_rms_norm, [x, res, w], [Shard(dim), Shard(dim), Replicate()])
    with redistributions() as calls:  # a replicated residual is sliced locally (and the hook sees it)
        out, _ = llama_ext.fused_add_rms_norm(dt(x, Shard(1)), dt(res, Replicate()), dt(w, Replicate()))
    assert calls == ["(Replicate(),) -> (Shard(dim=1),)"], calls
    assert_close(out.full_tensor(), llama_ext.fused_add_rms_norm(x, res, w)[0], torch.float32)
    xs, rs, ws = dt(x, Shard(1)), dt(res, Shard(1)), dt(w, Replicate())
    with torch.no_grad():
        expected_out, expected_res = llama_ext.fused_add_rms_norm(x, res, w)
        llama_ext.fused_add_rms_norm_(xs, rs, ws)
    assert_close(xs.full_tensor(), expected_out, torch.float32)
    assert_close(rs.full_tensor(), expected_res, torch.float32)

    cos, sin = llama_ext.rope_cos_sin(32, 64)
    q, k = torch.randn(2, 4 * world, 4, 32), torch.randn(2, 4 * world, 2, 32)
    pos_1d = torch.randperm(64)[: 4 * world]
    pos_2d = torch.randint(0, 64, (2, 4 * world))
    rope = llama_ext.apply_rotary
    check(rope, [q, k, cos, sin], [Shard(0), Shard(0), Replicate(), Replicate()])
    check(rope, [q, k, cos, sin], [Shard(2), Shard(2), Replicate(), Replicate()])
    check(rope, [q, k, cos, sin, pos_2d], [Shard(0), Shard(0), Replicate(), Replicate(), Shard(0)])
    check(rope, [q, k, cos, sin, pos_1d], [Shard(1), Shard(1), Replicate(), Replicate(), Shard(0)])
    check(rope, [q, k, cos, sin, pos_2d], [Shard(1), Shard(1), Replicate(), Replicate(), Shard(1)])
    check(rope, [q, k, cos, sin, pos_1d], [Shard(2), Shard(2), Replicate(), Replicate(), Replicate()])

    q, k, v = torch.randn(2, 24, 2 * world, 32), torch.randn(2, 24, world, 32), torch.randn(2, 24, world, 32)
    for dim in (0, 2):
        for causal in (True, False):
            check(llama_ext.gqa_attention, [q, k, v], [Shard(dim)] * 3, (causal,))
    lens = torch.tensor([0, 5, 17, 24], dtype=torch.int32)
    check(
        lambda q, k, v, cu: llama_ext.gqa_attention_varlen(q, k, v, cu, cu, 12, 12),
        [q[0], k[0], v[0], lens],
        [Shard(1)] * 3 + [Replicate()],
    )

    # Attention against a KV cache (inference, in place): heads or, contiguous, batch; the caches
    # are written on every rank's shard as on the full tensors.
    def check_kvcache(placements, paged=False):
        batch, cap, d = 2, 24, 32
        q, k_new, v_new = torch.randn(batch, 2, 2 * world, d), torch.randn(batch, 2, world, d), torch.randn(batch, 2, world, d)
        lens = torch.tensor([5, 13], dtype=torch.int32)
        if paged:
            caches = [torch.randn(7, 8, world, d) for _ in range(2)]
            table = torch.tensor([[3, 0, 5], [6, 1, 2]], dtype=torch.int32)
        else:
            caches = [torch.randn(batch, cap, world, d) for _ in range(2)]
            table = None
        args = dict(q=q, k_cache=caches[0], v_cache=caches[1], cache_seqlens=lens, k=k_new, v=v_new, block_table=table)
        with torch.no_grad():
            full = {n: t.clone() for n, t in args.items() if t is not None}
            expected = llama_ext.gqa_attention_with_kvcache(**full, return_lse=True)
            dts = {n: distribute_tensor(t.clone(), mesh, [placements.get(n, Replicate())]) for n, t in full.items()}
            with redistributions() as calls:
                got = llama_ext.gqa_attention_with_kvcache(**dts, return_lse=True)
            assert not calls, calls
        for g, e in zip(got, expected):
            assert_close(g.full_tensor(), e, torch.float32)
        for n in ("k_cache", "v_cache"):
            assert_close(dts[n].full_tensor(), full[n], torch.float32)

    heads = {n: Shard(2) for n in ("q", "k_cache", "v_cache", "k", "v")}
    check_kvcache(heads)
    check_kvcache(heads, paged=True)
    check_kvcache({n: Shard(0) for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v")})

    # Placements the ops cannot compute locally raise instead of gathering.
    def raises(fn, *args, match="cannot run locally"):
        with pytest.raises(RuntimeError, match=match):
            fn(*args)

    kv_q, kv_cache, kv_lens = torch.randn(2, 1, 2 * world, 32), torch.randn(2, 16, world, 32), torch.tensor([3, 9], dtype=torch.int32)
    kvcache = llama_ext.gqa_attention_with_kvcache
    with torch.no_grad():
        raises(kvcache, dt(kv_q, Shard(1)), dt(kv_cache, Shard(1)), dt(kv_cache.clone(), Shard(1)), dt(kv_lens, Replicate()))
        raises(kvcache, dt(kv_q, Shard(0)), dt(kv_cache, Shard(2)), dt(kv_cache.clone(), Shard(2)), dt(kv_lens, Replicate()))
        pool, table = torch.randn(6, 8, world, 32), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        raises(lambda *a: kvcache(*a[:4], block_table=a[4]), dt(kv_q, Shard(0)), dt(pool, Shard(0)),
               dt(pool.clone(), Shard(0)), dt(kv_lens, Shard(0)), dt(table, Shard(0)))

    raises(llama_ext.rms_norm, dt(x, Shard(2)), dt(w, Replicate()))
    raises(llama_ext.rms_norm, dt(x, Shard(1)), dt(w, Shard(0)))
    partial = DTensor.from_local(x / world, mesh, [Partial()])
    raises(llama_ext.rms_norm, partial, dt(w, Replicate()))
    raises(llama_ext.fused_add_rms_norm, dt(x, Shard(0)), dt(res, Shard(1)), dt(w, Replicate()))
    raises(llama_ext.gqa_attention, dt(q, Shard(1)), dt(k, Shard(1)), dt(v, Shard(1)))
    raises(llama_ext.gqa_attention, dt(q, Shard(3)), dt(k, Shard(3)), dt(v, Shard(3)))
    mqa = torch.randn(2, 24, 1, 32)
    raises(llama_ext.gqa_attention, dt(q, Shard(2)), dt(mqa, Shard(2)), dt(mqa, Shard(2)), match="whole query groups")
    q, k = torch.randn(2, 4 * world, 4, 32), torch.randn(2, 4 * world, 2, 32)
    raises(rope, dt(q, Shard(1)), dt(k, Shard(1)), dt(cos, Replicate()), dt(sin, Replicate()))  # no positions
    raises(rope, dt(q, Shard(3)), dt(k, Shard(3)), dt(cos, Replicate()), dt(sin, Replicate()))


def test_dtensor_sharding_rules():
    spawn(_dtensor_worker, 2)


# ---- HF Llama: DDP, FSDP2, tensor / sequence / context parallel ------------------------------


def _tiny_llama(transformers, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _full(t):
    """A DTensor's whole value (what one process would hold); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _params(model):
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _grads(model):
    return {n: _full(p.grad) for n, p in model.named_parameters()}


def _sgd(params, lr=0.5):
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def _one_process_training(model, batches, steps, compute_dtype):
    """The single-process run the parallel ones must reproduce: the full batch, fp32 master
    weights, forward/backward in ``compute_dtype`` (as a mixed-precision policy casts them)."""
    losses = []
    for step in range(steps):
        worker = copy.deepcopy(model).to(compute_dtype)
        loss = worker(input_ids=batches[step], labels=batches[step]).loss
        loss.backward()
        for p, q in zip(model.parameters(), worker.parameters()):
            p.grad = q.grad.float()
        _sgd(model.parameters())
        losses.append(loss.item())
    return losses


def _data_parallel_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import transformers
    from llama_ext.transformers import patch_model

    steps, per_rank = 3, 2
    batches = [torch.randint(0, 128, (per_rank * world, 64)) for _ in range(steps)]
    mine = [b[rank * per_rank:(rank + 1) * per_rank] for b in batches]
    base = patch_model(_tiny_llama(transformers))

    def run(wrapped):
        losses = []
        for step in range(steps):
            loss = wrapped(input_ids=mine[step], labels=mine[step]).loss
            loss.backward()
            _sgd(wrapped.parameters())
            loss = loss.detach().float()
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
        return losses

    for name, dtype in (("ddp", torch.float32), ("fsdp2", torch.float32), ("fsdp2-bf16", torch.bfloat16)):
        reference = copy.deepcopy(base)
        ref_losses = _one_process_training(reference, batches, steps, dtype)
        model = copy.deepcopy(base)
        if name == "ddp":
            losses = run(DistributedDataParallel(model))
        else:
            # fully_shard's default mesh is the accelerator's where there is one: these processes
            # test the CPU kernels under gloo on every machine.
            mesh = init_device_mesh("cpu", (world,))
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            losses = run(model)
        with case(name):
            assert_close(torch.tensor(losses), torch.tensor(ref_losses), dtype)
            got, expected = _params(model), _params(reference)
            for n, initial in _params(base).items():  # what training changed, to the dtype's precision
                assert_close_to_max(got[n] - initial, expected[n] - initial, dtype, n)


def test_hf_llama_ddp_and_fsdp2_match_one_process():
    _require_transformers()
    spawn(_data_parallel_worker, 2)


def _tensor_parallel_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    import transformers
    from llama_ext.transformers import patch_model

    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(0, 128, (2, 96))
    positions = torch.arange(96).expand(2, -1)
    reference = patch_model(_tiny_llama(transformers))
    ref_loss = reference(input_ids=ids, labels=ids, position_ids=positions).loss
    ref_loss.backward()
    expected = _grads(reference)

    def tp_plan(sequence_parallel):
        """Megatron layout: q/k/v and gate/up column-wise (each rank its heads), o/down row-wise;
        with sequence parallel the norms and the residual stream are sharded along the sequence."""
        out = dict(use_local_output=False, output_layouts=Shard(1)) if sequence_parallel else {}
        plan = {}
        for i in range(len(reference.model.layers)):
            layer = f"model.layers.{i}."
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                plan[layer + proj] = ColwiseParallel()
            plan[layer + "self_attn.o_proj"] = RowwiseParallel(**out)
            plan[layer + "mlp.down_proj"] = RowwiseParallel(**out)
            if sequence_parallel:
                plan[layer + "input_layernorm"] = SequenceParallel()
                plan[layer + "post_attention_layernorm"] = SequenceParallel()
                plan[layer + "self_attn"] = PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": Shard(1)},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                )
                plan[layer + "mlp"] = PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                )
        if sequence_parallel:
            plan["model.embed_tokens"] = RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
            )
            plan["model.norm"] = SequenceParallel()
            plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
        return plan

    for sequence_parallel in (False, True):
        model = parallelize_module(copy.deepcopy(reference), mesh, tp_plan(sequence_parallel))
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
        loss.backward()
        with case(f"sequence_parallel={sequence_parallel}"):
            assert_close(loss, ref_loss, torch.float32)
            got = _grads(model)
            for n, g in expected.items():
                assert_close_to_max(got[n], g, torch.float32, n)
        if sequence_parallel:  # the norms ran on sequence shards (DTensors) through the sharding rules
            assert model.model.layers[0].input_layernorm.weight.placements == (Replicate(),)


def test_hf_llama_tensor_and_sequence_parallel_match_one_process():
    _require_transformers()
    spawn(_tensor_parallel_worker, 2)


def _context_parallel_worker(rank, world):
    import torch.nn.functional as F

    import transformers
    from llama_ext.transformers import patch_model

    steps, seq = 2, 64 * world
    base = patch_model(_tiny_llama(transformers))
    reference = copy.deepcopy(base)
    model = patch_model(copy.deepcopy(base), context_parallel_group=dist.group.WORLD)
    positions = torch.arange(seq).expand(2, -1)
    for step in range(steps):
        ids = torch.randint(0, 128, (2, seq))
        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        expected = _grads(reference)

        # Labels are shifted on the whole sequence, before sharding; the mean is over all ranks' tokens.
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        logits = model(
            input_ids=shard_for_context_parallel(ids, 1), position_ids=shard_for_context_parallel(positions, 1)
        ).logits
        local_labels = shard_for_context_parallel(labels, 1)
        loss = F.cross_entropy(logits.float().flatten(0, 1), local_labels.flatten(), reduction="sum")
        loss = loss / (labels != -100).sum()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        dist.all_reduce(loss.detach())
        with case(f"step {step}"):
            assert_close(loss.detach(), ref_loss.detach(), torch.float32)
            got = _grads(model)
            for n, g in expected.items():
                assert_close_to_max(got[n], g, torch.float32, n)
        _sgd(reference.parameters())
        _sgd(model.parameters())

    ids_l = shard_for_context_parallel(torch.randint(0, 128, (1, seq)), 1)
    with pytest.raises(ValueError, match="needs position_ids"):
        model(input_ids=ids_l)
    with pytest.raises(ValueError, match="needs position_ids"):
        model(input_ids=ids_l, position_ids=torch.arange(ids_l.shape[1])[None])


def test_hf_llama_context_parallel_trains_like_one_process():
    world = 2  # ring attention itself is tested on 3 processes too
    _require_transformers()
    spawn(_context_parallel_worker, world)
