"""Vocab-parallel KL (``kl_div(..., process_group=g)``): each rank holds a contiguous slice of the vocabulary.

Two layers of tests:

* in one process, on every backend: the three pieces (``kl_div_stats``, ``kl_div_jsd_sums``, ``kl_div_vp_fwd``)
  run on slices of a vocabulary that does not divide evenly, their statistics combined by hand as the ranks
  would (max, rescaled sums), equal the single-process op on the whole rows; opcheck and
  ``torch.compile(fullgraph=True)`` of the pieces;
* with 2 and 4 gloo processes (spawned, file store in ``tmp_path``, 30 s group timeout): ``kl_div`` with a
  process group equals the single-process ``kl_div`` on the concatenated logits (loss and each rank's slice of
  the gradient) for every mode, temperatures {0.5, 1, 2}, masks / labels and reductions; inconsistent
  arguments across ranks raise a ``ValueError`` naming them on every rank.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from minitron.ops import BackendUnavailableError, KLDivLoss, kl_div
from minitron.ops import kl as klmod
from minitron.ops._dispatch import op_backends

V = 1001
TEMPS = (0.5, 1.0, 2.0)
MODES = (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0))
REDUCTIONS = ("mean", "sum", "none")
TOL = dict(rtol=2e-4, atol=1e-5)  # fp32, as tests/ops/test_kl_div.py


def _backend_or_skip(backend: str) -> str:
    for op in ("kl_div_stats", "kl_div_jsd_sums", "kl_div_vp_fwd", "kl_div"):
        try:
            op_backends(op).select(backend, "cpu", torch.float32)
        except BackendUnavailableError as exc:
            if backend == "cpp" and os.environ.get("CI"):
                pytest.fail(f"the C++ backend must be built in CI: {exc}")
            pytest.skip(str(exc))
    return backend


@pytest.fixture(params=["cpp", "triton", "reference"])
def backend(request) -> str:
    return _backend_or_skip(request.param)


def _bounds(v: int, parts: int) -> list[int]:
    """Uneven contiguous slices: sizes differ by more than rounding (the first slice is the smallest)."""
    w = torch.arange(1, parts + 1, dtype=torch.float64)
    extra = torch.floor(torch.cumsum(w, 0) / w.sum() * (v - parts)).long().tolist()  # each slice >= 1 entry
    return [0] + [e + i + 1 for i, e in enumerate(extra[:-1])] + [v]


def _data(v: int = V, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[3, 5, v] student/teacher logits with -inf entries (also a whole first slice of row 0, in both), an all
    -inf teacher row (contributes 0) and a mask."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 5, v, generator=g) * 3
    t = s * 0.6 + torch.randn(3, 5, v, generator=g) * 2
    s[0, 0, : v // 3] = float("-inf")
    t[0, 0, : v // 3] = float("-inf")
    holes = torch.rand(3, 5, v, generator=g) < 0.05
    s[holes] = float("-inf")
    t[holes] = float("-inf")
    t[1, 2] = float("-inf")
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[1, 2] = True
    return s, t, mask


def _single(s, t, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = s.detach().clone().requires_grad_(True)
    loss = kl_div(leaf, t, **kw)
    (loss * _upstream(loss)).sum().backward()
    return loss.detach(), leaf.grad


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """A non-uniform upstream gradient for reduction='none' (rows rescaled in backward)."""
    if loss.dim() == 0:
        return torch.ones(())
    return torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)


def _assert_close(got_loss, got_grad, ref_loss, ref_grad, what: str) -> None:
    torch.testing.assert_close(got_loss, ref_loss, **TOL, equal_nan=True, msg=lambda m: f"{what} loss: {m}")
    gscale = float(ref_grad.abs().nan_to_num(0.0, 0.0, 0.0).max()) if ref_grad.numel() else 1.0
    torch.testing.assert_close(got_grad, ref_grad, rtol=TOL["rtol"], atol=TOL["atol"] * max(gscale, 1e-3),
                               equal_nan=True, msg=lambda m: f"{what} grad: {m}")


# ------------------------------------------------------------------------------------------------
# one process: the pieces on slices, combined by hand
# ------------------------------------------------------------------------------------------------


def _combine(stats: list[torch.Tensor], mode: int) -> torch.Tensor:
    """What the all-reduces compute (written independently of minitron.ops.kl._combine_stats)."""
    st = torch.stack(stats)  # [R, N, 5]
    ma, mb = st[..., 0].amax(0), st[..., 2].amax(0)
    ra = torch.where(ma == float("-inf"), 0.0, torch.exp(st[..., 0] - ma))
    rb = torch.where(mb == float("-inf"), 0.0, torch.exp(st[..., 2] - mb))
    rc = rb if mode == 0 else ra
    c = st[..., 4]
    c = torch.where(c == float("inf"), c, c * rc).sum(0) if mode != 2 else torch.zeros_like(ma)
    return torch.stack([ma, (st[..., 1] * ra).sum(0), mb, (st[..., 3] * rb).sum(0), c], dim=1)


def _simulated(s, t, parts: int, mode: str, beta: float, temperature: float, backend: str, weight=None,
               scale: float = 1.0):
    """Loss [N] and gradient [N, V] from the per-slice pieces (no process group)."""
    n, v = s.shape
    w = torch.ones(n, device=s.device) if weight is None else weight
    m = klmod.MODES[mode]
    if m == 2 and klmod._jsd_end(beta) is not None:
        m = klmod.MODES[klmod._jsd_end(beta)]
    b = _bounds(v, parts)
    sl = [(s[:, b[i]:b[i + 1]].contiguous(), t[:, b[i]:b[i + 1]].contiguous()) for i in range(parts)]
    stats = _combine([torch.ops.minitron.kl_div_stats(a, c, w, m, temperature, backend) for a, c in sl], m)
    sums = None
    if m == 2:
        sums = sum(torch.ops.minitron.kl_div_jsd_sums(a, c, w, stats, temperature, beta, backend) for a, c in sl)
    outs = [torch.ops.minitron.kl_div_vp_fwd(a, c, w, stats, sums, m, temperature, beta, scale, backend, True)
            for a, c in sl]
    for loss, _ in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=0, atol=0, equal_nan=True)  # the same on every slice
    return outs[0][0], torch.cat([g for _, g in outs], dim=1)


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("mode,beta", MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("temperature", TEMPS)
def test_pieces_on_slices_equal_single_process(backend, parts, mode, beta, temperature):
    if backend == "triton" and (parts == 2 or temperature != 1.0):
        pytest.skip("interpreter: a subset")
    s, t, mask = _data(V if backend != "triton" else 203)
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    w = mask.reshape(-1).float() * 0.25
    loss, grad = _simulated(s, t, parts, mode, beta, temperature, backend, weight=w, scale=temperature ** 2)
    ref_loss, ref_grad = torch.ops.minitron.kl_div_fwd(s, t, w, klmod.MODES[mode], temperature, beta,
                                                       temperature ** 2, backend, True)
    _assert_close(loss, grad, ref_loss, ref_grad, f"{backend} parts={parts}")
    assert bool(torch.isfinite(loss).all())
    assert float(loss[1 * 5 + 2]) == 0.0 and bool((grad[1 * 5 + 2] == 0).all())  # all -inf teacher row


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), v=st.integers(1, 3000), parts=st.integers(1, 6), mode=st.sampled_from(MODES),
       temperature=st.sampled_from(TEMPS), spread=st.floats(0.1, 20.0), seed=st.integers(0, 2 ** 16))
def test_pieces_property_cpp(n, v, parts, mode, temperature, spread, seed):
    """Random shapes, slice counts (slices of 1 entry included) and logit spreads: the pieces equal the fused op."""
    _backend_or_skip("cpp")
    parts = min(parts, v)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * spread
    t = s * 0.5 + torch.randn(n, v, generator=g) * spread
    loss, grad = _simulated(s, t, parts, mode[0], mode[1], temperature, "cpp")
    ref_loss, ref_grad = torch.ops.minitron.kl_div_fwd(s, t, torch.ones(n), klmod.MODES[mode[0]], temperature,
                                                       mode[1], 1.0, "cpp", True)
    _assert_close(loss, grad, ref_loss, ref_grad, f"n={n} v={v} parts={parts}")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("mode,beta", MODES[:4], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pieces_cpp_isa_paths(isa, mode, beta, dtype, monkeypatch):
    """Every CPU code path (a path the CPU lacks runs the next lower one), several 1024-entry chunks per slice."""
    _backend_or_skip("cpp")
    monkeypatch.setenv("MINITRON_CPU_ISA", isa)
    s, t, mask = _data(5003, seed=1)
    s, t = s.reshape(-1, 5003).to(dtype), t.reshape(-1, 5003).to(dtype)
    w = mask.reshape(-1).float()
    loss, grad = _simulated(s, t, 3, mode, beta, 2.0, "cpp", weight=w, scale=4.0)
    ref_loss, ref_grad = torch.ops.minitron.kl_div_fwd(s, t, w, klmod.MODES[mode], 2.0, beta, 4.0, "cpp", True)
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, ref_loss, **tol, equal_nan=True)
    gscale = float(ref_grad.float().abs().max())
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol["rtol"], atol=tol["atol"] * gscale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode,beta", MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pieces_on_gpu(gpu_backend, mode, beta, dtype):
    """The CUDA C++ and compiled Triton pieces on CUDA tensors (skipped without a GPU)."""
    try:
        for op in ("kl_div_stats", "kl_div_jsd_sums", "kl_div_vp_fwd"):
            op_backends(op).select(gpu_backend, "cuda", dtype)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    s, t, mask = _data(32003, seed=2)
    s, t = s.reshape(-1, 32003).to("cuda", dtype), t.reshape(-1, 32003).to("cuda", dtype)
    w = mask.reshape(-1).float().cuda()
    loss, grad = _simulated(s, t, 3, mode, beta, 2.0, gpu_backend, weight=w, scale=4.0)
    ref_loss, ref_grad = torch.ops.minitron.kl_div_fwd(s, t, w, klmod.MODES[mode], 2.0, beta, 4.0, gpu_backend, True)
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, ref_loss, **tol, equal_nan=True)
    gscale = float(ref_grad.float().abs().max())
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol["rtol"], atol=tol["atol"] * gscale)


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_pieces_nan_and_inf_rows(backend, mode):
    """A NaN in one slice makes the row NaN; forward KL with a student -inf where the teacher has mass is +inf."""
    s, t, _ = _data(40)
    s, t = s.reshape(-1, 40)[:4].clone(), t.reshape(-1, 40)[:4].clone()
    s[1, 3] = float("nan")
    s[2, 35] = float("-inf")
    t[2, 35] = 1.0
    loss, _ = _simulated(s, t, 3, mode, 0.5, 1.0, backend)
    ref, _ = torch.ops.minitron.kl_div_fwd(s, t, torch.ones(4), klmod.MODES[mode], 1.0, 0.5, 1.0, backend, True)
    assert torch.isnan(loss[1]) and torch.isnan(ref[1])
    torch.testing.assert_close(loss, ref, **TOL, equal_nan=True)


def test_pieces_opcheck(backend):
    s, t, mask = _data(37)
    s, t = s.reshape(-1, 37)[:6].contiguous(), t.reshape(-1, 37)[:6].contiguous()
    w = torch.ones(6)
    for m in (0, 1, 2):
        torch.library.opcheck(torch.ops.minitron.kl_div_stats.default, (s, t, w, m, 1.5, backend))
        stats = torch.ops.minitron.kl_div_stats(s, t, w, m, 1.5, backend)
        sums = None
        if m == 2:
            torch.library.opcheck(torch.ops.minitron.kl_div_jsd_sums.default, (s, t, w, stats, 1.5, 0.3, backend))
            sums = torch.ops.minitron.kl_div_jsd_sums(s, t, w, stats, 1.5, 0.3, backend)
        torch.library.opcheck(torch.ops.minitron.kl_div_vp_fwd.default,
                              (s.clone().requires_grad_(True), t, w, stats, sums, m, 1.5, 0.3, 2.25, backend, True))


def test_pieces_compile_fullgraph(backend):
    s, t, _ = _data(37)
    s, t = s.reshape(-1, 37)[:6].contiguous(), t.reshape(-1, 37)[:6].contiguous()
    w = torch.full((6,), 1 / 6)

    def f(s, t):  # one "rank" holding the whole vocabulary: its statistics are the global ones
        out = []
        for m in (0, 1, 2):
            stats = torch.ops.minitron.kl_div_stats(s.detach(), t, w, m, 2.0, backend)
            sums = torch.ops.minitron.kl_div_jsd_sums(s.detach(), t, w, stats, 2.0, 0.3, backend) if m == 2 else None
            out.append(torch.ops.minitron.kl_div_vp_fwd(s, t, w, stats, sums, m, 2.0, 0.3, 4.0, backend, True)[0])
        return torch.stack(out).sum()

    leaf = s.clone().requires_grad_(True)
    f(leaf, t).backward()
    cleaf = s.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(cleaf, t).backward()
    ref = sum(kl_div(s, t, mode=md, temperature=2.0, beta=0.3, backend=backend, reduction="mean")
              for md in ("forward", "reverse", "jsd"))
    torch.testing.assert_close(f(s, t), ref, **TOL)
    torch.testing.assert_close(cleaf.grad, leaf.grad, **TOL)


def test_bytes_per_row_is_constant():
    assert klmod.vp_bytes_per_row("forward") == 20 == klmod.vp_bytes_per_row("reverse")
    assert klmod.vp_bytes_per_row("jsd", 0.5) == 40
    assert klmod.vp_bytes_per_row("jsd", 0.0) == 20  # runs as forward KL


def test_process_group_needs_init():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        kl_div(s, t, process_group=object())


# ------------------------------------------------------------------------------------------------
# gloo processes
# ------------------------------------------------------------------------------------------------


def _cases(full: bool) -> list[dict]:
    out = []
    for mode, beta in MODES:
        for temperature in (TEMPS if full else (0.5, 2.0)):
            for reduction in REDUCTIONS:
                for masking in ("none", "mask", "labels"):
                    if not full and masking == "labels":
                        continue
                    out.append(dict(mode=mode, beta=beta, temperature=temperature, reduction=reduction,
                                    masking=masking))
    return out


def _kwargs(case: dict, mask: torch.Tensor) -> dict:
    kw = dict(mode=case["mode"], beta=case["beta"], temperature=case["temperature"], reduction=case["reduction"])
    if case["masking"] == "mask":
        kw["mask"] = mask
    elif case["masking"] == "labels":
        kw["labels"] = torch.where(mask, torch.arange(mask.numel()).reshape(mask.shape), torch.full_like(
            mask, -100, dtype=torch.long))
    return kw


def _key(case: dict) -> str:
    return "-".join(str(case[k]) for k in ("mode", "beta", "temperature", "reduction", "masking"))


def _worker(rank: int, world: int, store: str, backend: str, out_dir: str, full: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        s_full, t_full, mask = _data()
        b = _bounds(V, world)
        s, t = s_full[..., b[rank]:b[rank + 1]], t_full[..., b[rank]:b[rank + 1]]
        out = {}
        for case in _cases(full):
            leaf = s.clone().requires_grad_(True)
            loss = kl_div(leaf, t, backend=backend, process_group=dist.group.WORLD, **_kwargs(case, mask))
            (loss * _upstream(loss)).sum().backward()
            out[_key(case)] = (loss.detach(), leaf.grad)
        with torch.no_grad():  # loss only (no gradient pass)
            out["no_grad"] = (kl_div(s, t, backend=backend, process_group=dist.group.WORLD, mode="jsd"),
                              torch.zeros(0))
        # transforms are per element: they apply to each slice
        leaf = s.clone().requires_grad_(True)
        loss = kl_div(leaf, t, backend=backend, process_group=dist.group.WORLD, student_softcap=5.0,
                      teacher_logit_scale=0.5, mask=mask)
        loss.backward()
        out["transforms"] = (loss.detach(), leaf.grad)
        leaf = s.clone().requires_grad_(True)
        loss = KLDivLoss(mode="reverse", temperature=2.0, backend=backend, process_group=dist.group.WORLD)(leaf, t)
        loss.backward()
        out["module"] = (loss.detach(), leaf.grad)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/ops/test_importance_distributed.py: no interpreter teardown racing gloo's threads


def _run(world: int, backend: str, tmp_path: Path, full: bool) -> None:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), backend, str(tmp_path), full), nprocs=world, join=True)
    s_full, t_full, mask = _data()
    b = _bounds(V, world)
    expect = {}
    for case in _cases(full):
        expect[_key(case)] = _single(s_full, t_full, backend=backend, **_kwargs(case, mask))
    with torch.no_grad():
        expect["no_grad"] = (kl_div(s_full, t_full, backend=backend, mode="jsd"), torch.zeros(0))
    leaf = s_full.clone().requires_grad_(True)
    loss = kl_div(leaf, t_full, backend=backend, student_softcap=5.0, teacher_logit_scale=0.5, mask=mask)
    loss.backward()
    expect["transforms"] = (loss.detach(), leaf.grad)
    expect["module"] = _single(s_full, t_full, backend=backend, mode="reverse", temperature=2.0)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expect)
        for key, (ref_loss, ref_grad) in expect.items():
            g_loss, g_grad = got[key]
            ref_slice = ref_grad[..., b[rank]:b[rank + 1]] if ref_grad.numel() else ref_grad
            _assert_close(g_loss, g_grad, ref_loss, ref_slice, f"world={world} rank={rank} {key}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_equals_single_process(world, tmp_path: Path):
    backend = "cpp"
    try:
        _backend_or_skip(backend)
    except pytest.skip.Exception:
        backend = "reference"
    _run(world, backend, tmp_path, full=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gloo_reference_backend(tmp_path: Path):
    """The torch pieces under the same wiring (the Triton pieces are covered in one process above)."""
    _run(2, "reference", tmp_path, full=False)


def _error_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    messages = []
    try:
        g = dist.group.WORLD
        s, t = torch.randn(4 + rank, 7), torch.randn(4 + rank, 7)  # rank 1 has one more row
        for kw in (dict(), dict(temperature=1.0 + rank), dict(mask=torch.tensor([True, rank == 0, True, True])),
                   dict(mode="jsd", beta=0.5 if rank else 0.25)):
            x, y = (s, t) if not kw else (s[:4], t[:4])
            try:
                kl_div(x, y, backend="reference", process_group=g, **kw)
                messages.append("no error")
            except ValueError as exc:
                messages.append(str(exc))
        # a rank whose own arguments are invalid: it raises its error, the others learn of it (no hang)
        try:
            kl_div(s[:4], t[:4], backend="reference", process_group=g, mask=torch.ones(4 + rank, dtype=torch.bool))
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
        # and afterwards the group still works
        loss = kl_div(s[:4], t[:4], backend="reference", process_group=g)
        messages.append(f"ok {float(loss) >= 0}")
        torch.save(messages, os.path.join(out_dir, f"err{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gloo_inconsistent_arguments_raise(tmp_path: Path):
    mp.spawn(_error_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        msgs = torch.load(tmp_path / f"err{rank}.pt")
        assert len(msgs) == 6
        for msg, what in zip(msgs, ("rows (N)", "temperature", "mask/labels", "beta")):
            assert what in msg and "differs across the ranks" in msg, (rank, msg)
        if rank == 1:
            assert "mask must have shape (4,)" in msgs[4], msgs[4]
        else:
            assert "another rank of the group rejected its arguments" in msgs[4], msgs[4]
        assert msgs[5] == "ok True"
