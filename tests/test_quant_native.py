"""The quantizer's native kernels (weightops.quant.native) against the torch code they
stand in for, which stays the fallback: the same conversions, extremes, codes and packed
bytes exactly, per-group sums to float rounding, and the same output whatever the
threads."""

from __future__ import annotations

import concurrent.futures
import ctypes
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightops.quant import clipsearch, grids, mixed, native, rows

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


@pytest.fixture
def torch_path(monkeypatch):
    """Call the returned function to run what follows on the torch path."""

    def switch() -> None:
        monkeypatch.setattr(native, "library", lambda: None)

    return switch


def groups_of(rows_: int, n_groups: int, gs: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows_, n_groups, gs, generator=gen) * 0.02
    # Heavy tails as real weights have, a constant group and a two-valued one.
    w[:, :, 0] *= 8
    w[0, 0] = 0.25
    w[1, 1] = torch.where(torch.arange(gs) % 2 == 0, 0.1, -0.3)
    return w


@pytest.mark.parametrize("gs", [64, 16])
def test_stack_from_bf16_is_exact_with_its_extremes(gs, torch_path):
    w = groups_of(40, 6, gs).reshape(40, -1).bfloat16()
    w[3, 5] = float("nan")
    w[5, 2] = float("inf")
    fast, (lo, hi) = mixed._stack([w], gs)
    fast, lo, hi = fast.clone(), lo.clone(), hi.clone()
    torch_path()
    slow, (lo_t, hi_t) = mixed._stack([w], gs)
    # Bit for bit, NaN included.
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    assert torch.equal(fast.view(torch.int32), w.float().reshape(40, -1, gs).view(torch.int32))
    assert torch.allclose(lo, lo_t, equal_nan=True) and torch.equal(lo.isnan(), lo_t.isnan())
    assert torch.allclose(hi, hi_t, equal_nan=True)
    assert lo[3, 0].isnan() and hi[3, 0].isnan()  # the NaN's group
    assert hi[5, 0].isinf() and not lo[5, 0].isnan()


@pytest.mark.parametrize("gs", [64, 24])
def test_extremes_of_float32_groups(gs, torch_path):
    w = groups_of(30, 5, gs)
    w[2, 3, 1] = float("nan")
    lo, hi = clipsearch.group_extremes(w)
    torch_path()
    lo_t, hi_t = clipsearch.group_extremes(w)
    assert torch.allclose(lo, lo_t, equal_nan=True) and torch.allclose(hi, hi_t, equal_nan=True)
    assert lo[2, 3].isnan() and hi[2, 3].isnan()
    assert torch.equal(lo[0], w[0].amin(-1)) and torch.equal(hi[7], w[7].amax(-1))


@pytest.mark.parametrize("gs", [64, 24])
def test_clip_search_agrees_with_torch(gs, torch_path):
    w = groups_of(300, 8, gs)
    ext = clipsearch.group_extremes(w)
    fast = clipsearch.search_2bit(w, None, grids.CLIP2, ext, need_error=True)
    torch_path()
    slow = clipsearch.search_2bit(w, None, grids.CLIP2, ext, need_error=True)
    factor, err, s, lo, c, e, g2 = fast
    same = factor == slow[0]
    # A factor may flip only where two factors' errors tie to float rounding.
    assert same.float().mean() > 0.995
    assert torch.equal(c, slow[4]) and torch.all(c == gs)
    scale = (ext[1] - ext[0]).clamp_min(1e-6)
    for mine, ref in ((s, slow[2]), (lo, slow[3])):
        assert torch.allclose(mine[same] / scale[same], ref[same] / scale[same], atol=1e-5)
    ref_err = slow[1][same]
    assert torch.allclose(err[same], ref_err, rtol=1e-3, atol=1e-4 * float(ref_err.max()))
    assert torch.allclose(e, slow[5], atol=1e-6 * gs) and torch.allclose(g2, slow[6], rtol=1e-4)
    # The degenerate groups (no range; two values) choose as torch does.
    assert factor[0, 0] == slow[0][0, 0] and factor[1, 1] == slow[0][1, 1]
    # The constant group keeps a grid of positive step through its value.
    assert s[0, 0] > 0 and torch.isclose(lo[0, 0], torch.tensor(0.25))


@pytest.mark.parametrize(("bits", "steps"), [(2, 1), (4, 2)])
def test_refinement_steps_agree_with_torch(bits, steps, torch_path):
    w = groups_of(200, 6, 64)
    ext = clipsearch.group_extremes(w)
    _, _, s, lo, *totals = clipsearch.search_2bit(w, None, grids.CLIP2, ext)
    given = s.clone(), lo.clone()
    fast = grids._refine_with_error(w, None, s, lo, bits, steps, tuple(totals))
    torch_path()
    slow = grids._refine_with_error(w, None, s, lo, bits, steps, tuple(totals))
    for mine, ref in zip(fast[:2], slow[:2], strict=True):
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7)
    # The error is a difference of sums of the size of Σx²: near zero, float rounding of
    # those dominates (the two-valued group fits its grid exactly).
    assert torch.all((fast[2] - slow[2]).abs() <= 1e-4 * slow[2] + 1e-5 * totals[2])
    # The inputs are left as they were: the kernel works on copies.
    assert torch.equal(s, given[0]) and torch.equal(lo, given[1])


@pytest.mark.parametrize(("gs", "k4"), [(64, 2), (32, 0), (128, 3), (16, 4)])
def test_rounding_and_packing_in_one_pass_gives_the_same_bytes(gs, k4):
    n_groups = 4 if gs >= 32 else 8
    k4 = min(k4, n_groups)
    w = groups_of(50, n_groups, gs, seed=3)
    gen = torch.Generator().manual_seed(1)
    is4 = torch.zeros(50, n_groups, dtype=torch.bool)
    is4.scatter_(1, torch.rand(50, n_groups, generator=gen).topk(k4, dim=1).indices, True)
    lo = w.amin(-1) * 0.9
    s = ((w.amax(-1) - lo) / torch.where(is4, 15.0, 3.0)).clamp_min(1e-12)
    fast = rows.empty_parts(50, n_groups * gs, gs, k4, 0)
    err, w_sq = rows.round_packed(fast, w, is4, s, lo)
    slow = rows.empty_parts(50, n_groups * gs, gs, k4, 0)
    codes, err_t, w_sq_t = rows.round_codes(w, is4, s, lo, None)
    rows.store_codes(slow, codes, is4)
    for part in ("q2", "q4"):
        assert torch.equal(fast[part], slow[part]), part
    assert torch.allclose(err, err_t, rtol=1e-5) and torch.allclose(w_sq, w_sq_t, rtol=1e-5)


@pytest.mark.parametrize("gs", [12, 2048])
def test_group_sizes_the_kernels_do_not_take_fall_back_to_torch(gs, torch_path):
    w = groups_of(4, 2, gs)
    parts = rows.empty_parts(4, 2 * gs, gs, 0, 0)
    is4 = torch.zeros(4, 2, dtype=torch.bool)
    assert rows.round_packed(parts, w, is4, torch.ones(4, 2), torch.zeros(4, 2)) is None
    fast = clipsearch.search_2bit(w, None, grids.CLIP2)
    torch_path()
    slow = clipsearch.search_2bit(w, None, grids.CLIP2)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_quantized_model_weights_barely_differ_from_the_torch_path(torch_path):
    gen = torch.Generator().manual_seed(5)
    weights = [(torch.randn(96, 576, generator=gen) * 0.02).bfloat16() for _ in range(3)]
    fast = mixed.quantize_together(weights)
    torch_path()
    slow = mixed.quantize_together(weights)
    changed = total = 0
    for (p, err), (q, err_t) in zip(fast, slow, strict=True):
        assert abs(err - err_t) < 1e-4 * err_t
        for name, value in p.parts().items():
            changed += int((value != q.parts()[name]).sum())
            total += value.numel()
    assert changed < 0.01 * total


def test_threads_split_the_work_without_changing_a_byte():
    gen = torch.Generator().manual_seed(6)
    weights = [(torch.randn(700, 640, generator=gen) * 0.02).bfloat16() for _ in range(2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mixed.quantize_together(weights)
        torch.set_num_threads(3)
        three = mixed.quantize_together(weights)
        assert torch.get_num_threads() == 3  # torch's own count is given back
    finally:
        torch.set_num_threads(before)
    for (p, err), (q, err_q) in zip(one, three, strict=True):
        assert err == pytest.approx(err_q, rel=1e-12)
        for name, value in p.parts().items():
            assert torch.equal(value, q.parts()[name]), name


def test_kernels_refuse_tensors_that_are_not_contiguous():
    w = torch.zeros(8, 64).t()
    lo, hi = torch.empty(64), torch.empty(64)
    with pytest.raises(ValueError, match="contiguous"):
        native.run("wo_extremes", 64, w, lo, hi, 8)


def _library_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "from weightops.quant import native; print(native.library() is not None)"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )


def test_switched_off_or_without_a_compiler_the_torch_path_runs(monkeypatch, tmp_path):
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    assert _library_in_subprocess({**env, "WEIGHTOPS_NATIVE": "0"}).stdout.strip() == "False"
    missing = _library_in_subprocess({**env, "CC": str(tmp_path / "no-such-cc")})
    assert missing.stdout.strip() == "False" and not missing.stderr
    broken = _library_in_subprocess({**env, "CC": "false"})
    assert broken.stdout.strip() == "False" and "did not build" in broken.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_concurrent_first_builds_leave_one_whole_library(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = [shutil.which("cc") or "gcc"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: native._compile(compiler), range(3)))
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path / "weightops" / "native"
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # no leftovers
    lib = ctypes.CDLL(str(paths[0]))
    assert hasattr(lib, "wo_search_2bit")
    assert native._compile(compiler) == paths[0]  # built once, then found


@pytest.mark.parametrize(
    ("options", "aside"),
    [({}, True), ({"outliers": 2, "k4": 0}, False), ({"importance": torch.ones(1024)}, False)],
)
def test_torch_keeps_its_threads_where_the_kernels_leave_the_work_to_it(
    options, aside, monkeypatch
):
    entered = []
    real = native.torch_aside

    def spy():
        entered.append(True)
        return real()

    monkeypatch.setattr(native, "torch_aside", spy)
    mixed.quantize_together([torch.randn(32, 1024)], **options)
    assert bool(entered) == aside


def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = [shutil.which("cc") or "gcc"]
    path = native._compile(compiler)
    path.write_bytes(b"not a shared library")
    lib = native._load(compiler)
    assert hasattr(lib, "wo_round_pack") and path.read_bytes() != b"not a shared library"


@pytest.mark.parametrize("path", ["native", "torch"])
def test_a_group_of_denormal_range_quantizes_on_both_paths(path, torch_path):
    # k/r overflows for a range this narrow; the weight at the middle once made the key
    # NaN (an index far outside the histogram).
    if path == "torch":
        torch_path()
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(2)) * 1e-2
    w[0, :64] = 0.0
    w[0, :3] = torch.tensor([0.0, 5e-41, 1e-40])
    packed, err = mixed.quantize_together([w])[0]
    deq = mixed.dequantize(packed)
    assert torch.isfinite(deq).all() and err < 0.5
    assert deq[0, :64].abs().max() < 1e-30


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize(
    ("value", "match"), [(2e38, "float32 limit"), (1e8, "super-scale overflows")]
)
def test_values_the_format_cannot_hold_are_refused(path, value, match, torch_path):
    if path == "torch":
        torch_path()
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)) * 1e-2
    w[1, 0], w[1, 1] = value, -value
    with pytest.raises(mixed.QuantError, match=match):
        mixed.quantize_together([w])


# Any float32 (NaN, infinities, denormals, the largest finite values), or a few values
# repeated, so that groups are constant, two-valued or hold their exact middle.
_values = st.floats(width=32) | st.sampled_from([0.0, 1e-40, 5e-41, -1e-40, 1.0, -1.0, 0.5])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows_=st.integers(1, 4),
    groups=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_any_float_weight_is_quantized_or_refused_alike_on_both_paths(
    rows_, groups, dtype, data, monkeypatch
):
    cols = 64 * groups
    values = data.draw(st.lists(_values, min_size=rows_ * cols, max_size=rows_ * cols))
    w = torch.tensor(values, dtype=torch.float32).reshape(rows_, cols).to(dtype)
    outcome = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(native, "library", lambda: None)
        try:
            packed, err = mixed.quantize_together([w])[0]
        except mixed.QuantError as e:
            outcome[path] = str(e)
            continue
        deq = mixed.dequantize(packed)
        assert torch.isfinite(deq).all() and err == err  # err is not NaN
        outcome[path] = "ok"
    assert outcome["native"] == outcome["torch"]
