"""bnexp.layers against torch's own batch norm, with assert_close's default tolerances."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from bnexp import layers

from bnexp.nn import compiled
from bnexp.nn.compiled import CompiledBatchNorm1d
from bnexp.layers import BatchNorm1d, batch_norm

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "bnexp"


def make_pair(num_features, seed=0, cls=BatchNorm1d, **kwargs):
    """A native and a custom layer (cls) with the same random weight and bias (when affine)."""
    native = torch.nn.BatchNorm1d(num_features, **kwargs)
    custom = cls(num_features, **kwargs)
    if native.weight is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            native.weight.copy_(torch.randn(num_features, generator=gen, dtype=native.weight.dtype))
            if native.bias is not None:
                native.bias.copy_(torch.randn(num_features, generator=gen, dtype=native.bias.dtype))
    custom.load_state_dict(native.state_dict(), strict=True)
    return native, custom


def batch(shape, gen, dtype, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=gen, dtype=dtype) * scale + shift


def forward_and_grads(layer, x, upstream):
    """Output and the gradients of (output * upstream).sum() for input, weight, bias."""
    x = x.detach().requires_grad_()
    output = layer(x)
    wrt = [x] + [p for p in (layer.weight, layer.bias) if p is not None]
    return output, torch.autograd.grad(output, wrt, upstream)


def assert_same_state(custom, native):
    custom_state, native_state = custom.state_dict(), native.state_dict()
    assert custom_state.keys() == native_state.keys()
    for key in native_state:
        assert_close(custom_state[key], native_state[key], msg=lambda m: f"{key}: {m}")


def assert_step_agrees(custom, native, x, upstream):
    """Same output, input/weight/bias gradients and buffers after one forward + backward."""
    out_c, grads_c = forward_and_grads(custom, x, upstream)
    out_n, grads_n = forward_and_grads(native, x, upstream)
    assert_close(out_c, out_n)
    for got, want in zip(grads_c, grads_n, strict=True):
        assert_close(got, want)
    assert_same_state(custom, native)


# ----------------------------------------------------------------------------- parity grid

BATCH_SIZES = (2, 3, 17, 64)  # varied within a run: the n/(n-1) factor changes per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("length", [None, 4])
@pytest.mark.parametrize("num_features", [1, 7, 33])
def test_module_matches_native_through_train_eval_train(
    dtype, momentum, affine, track_running_stats, length, num_features
):
    """Outputs, grads, running stats and num_batches_tracked agree after every step."""
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track_running_stats, dtype=dtype)
    native, custom = make_pair(num_features, **kwargs)
    gen = torch.Generator().manual_seed(num_features)
    schedule = ["train"] * 4 + ["eval"] * 3 + ["train"] * 3
    for step, mode in enumerate(schedule):
        custom.train(mode == "train")
        native.train(mode == "train")
        n = BATCH_SIZES[step % len(BATCH_SIZES)]
        shape = (n, num_features) if length is None else (n, num_features, length)
        x = batch(shape, gen, dtype, scale=50.0 if step % 2 else 1.0, shift=10.0 if step % 2 else 0.0)
        assert_step_agrees(custom, native, x, batch(shape, gen, dtype))
        if mode == "eval":
            with torch.no_grad():
                assert_close(custom(x), native(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [10.0**-k for k in range(10)])
def test_module_matches_native_for_every_eps(dtype, eps):
    """eps from 1 down to 1e-9, small and widely spread inputs, train then eval."""
    native, custom = make_pair(6, eps=eps, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    # Batch variances from 1e-6 (below most eps) to 2500. The upstream gradient is scaled
    # with the input so that dx stays O(1): with std 1e-3, dx ~ dy / std, and float32 at
    # 1e3 has a resolution of 6e-5, coarser than the absolute tolerance 1e-5 (for torch
    # against itself too). A shift on the 1e-3-wide batch would likewise leave float32
    # only 3 significant digits of x - mean.
    for step, (scale, shift) in enumerate([(1.0, 3.0), (1e-3, 0.0), (50.0, 10.0), (1.0, 3.0)]):
        if step == 3:
            custom.eval()
            native.eval()
        x = batch((9, 6), gen, dtype, scale=scale, shift=shift)
        assert_step_agrees(custom, native, x, batch((9, 6), gen, dtype, scale=min(scale, 1.0)))


def test_module_without_bias_matches_native():
    """The keyword-only bias=False (affine scale, no shift) of torch's BatchNorm1d."""
    native, custom = make_pair(5, bias=False)
    assert custom.bias is None and repr(custom) == repr(native)
    gen = torch.Generator().manual_seed(0)
    for mode in ("train", "eval"):
        custom.train(mode == "train")
        native.train(mode == "train")
        assert_step_agrees(custom, native, batch((8, 5), gen, torch.float32), batch((8, 5), gen, torch.float32))


def test_gradient_of_a_plain_sum_matches_native():
    """y.sum().backward() hands backward an expanded (zero-stride) gradient."""
    native, custom = make_pair(4)
    x = torch.randn(6, 4) * 50 + 10
    xs = [x.clone().requires_grad_() for _ in range(2)]
    custom(xs[0]).sum().backward()
    native(xs[1]).sum().backward()
    assert_close(xs[0].grad, xs[1].grad)
    assert_close(custom.weight.grad, native.weight.grad)
    assert_close(custom.bias.grad, native.bias.grad)


def test_in_place_op_on_output_does_not_break_backward():
    """Without affine the output is the normalized tensor; relu_ on it must stay legal."""
    native, custom = make_pair(4, affine=False)
    x = torch.randn(6, 4)
    grads = []
    for layer in (custom, native):
        xg = x.clone().requires_grad_()
        layer(xg).relu_().sum().backward()
        grads.append(xg.grad)
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("features", [64, 600])
def test_more_accurate_than_native_at_large_batch(features):
    """At n = 1024 float32 both drift from the float64 truth; ours drifts no more than torch.

    This is why the parity tests keep batches small: at large n torch's own float32
    reductions miss the float64 values by more than the default tolerance.
    """
    torch.manual_seed(0)
    x = torch.randn(1024, features) * 50 + 10
    upstream = torch.randn(1024, features)
    native, custom = make_pair(features)
    ours, theirs = errors_against_float64([custom, native], x, upstream)
    for mine, torchs in zip(ours, theirs, strict=True):
        assert mine <= torchs


def errors_against_float64(pair, x, upstream):
    """For each layer: the largest error of output, grads and running_var against float64.

    The float64 reference is torch's layer with the first layer's parameters.
    """
    truth, _ = make_pair(x.shape[1], dtype=torch.float64)
    truth.load_state_dict(pair[0].state_dict())
    out_t, grads_t = forward_and_grads(truth, x.double(), upstream.double())
    errors = []
    for layer in pair:
        out, grads = forward_and_grads(layer, x, upstream)
        errors.append([(a.double() - b).abs().max().item() for a, b in zip([out, *grads], [out_t, *grads_t])]
                      + [(layer.running_var.double() - truth.running_var).abs().max().item()])
    return errors


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, shape, affine):
    """Finite differences agree with the analytic backward (input, weight, bias)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    channels = shape[1]
    weight = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=affine)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=affine)
    running_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    running_var = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5

    def fn(x, weight, bias):
        # clones: every gradcheck evaluation must see the same running statistics
        return batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5)

    inputs = (x, weight, bias) if affine else (x, None, None)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_raises_a_clear_error(training):
    """Second derivatives are not implemented: autograd says so instead of being wrong."""
    layer = BatchNorm1d(3).train(training)
    x = torch.randn(5, 3, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_weight_is_read_through_its_property():
    """The module reads weight from nn.Module's table, or the ordinary way when it is not there."""
    native, custom = make_pair(4)
    x, upstream = torch.randn(6, 4) * 3 + 1, torch.randn(6, 4)
    results = []
    for layer in (custom, native):
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Doubled())
        xg = x.clone().requires_grad_()
        output = layer(xg)
        original = layer.parametrizations.weight.original
        results.append([output, *torch.autograd.grad(output, [xg, original, layer.bias], upstream)])
    for got, want in zip(*results, strict=True):
        assert_close(got, want)


def test_only_requested_gradients_are_computed():
    """A frozen weight gets no gradient; input and bias gradients still match torch."""
    native, custom = make_pair(4)
    for layer in (custom, native):
        layer.weight.requires_grad_(False)
    x = torch.randn(6, 4) * 3
    upstream = torch.randn(6, 4)
    grads = []
    for layer in (custom, native):
        xg = x.clone().requires_grad_()
        layer(xg).backward(upstream)
        assert layer.weight.grad is None
        grads.append((xg.grad, layer.bias.grad))
    for got, want in zip(*grads, strict=True):
        assert_close(got, want)


def saved_bytes(fn, *args):
    """Bytes of the tensors autograd saves for backward during fn(*args)."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return sum(sizes)


@pytest.mark.parametrize("affine", [True, False])
def test_saves_no_more_for_backward_than_native(affine):
    """Memory kept for the backward pass: at most what torch keeps."""
    native, custom = make_pair(64, affine=affine)
    x = torch.randn(256, 64, requires_grad=True)
    ours, theirs = saved_bytes(custom, x), saved_bytes(native, x)
    assert 0 < ours <= theirs


# ----------------------------------------------------------------------------- state and API


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_state_dict_round_trips_both_ways(affine, track_running_stats):
    """Custom -> native and native -> custom load strictly and give the same outputs."""
    kwargs = dict(affine=affine, track_running_stats=track_running_stats)
    gen = torch.Generator().manual_seed(0)
    source_custom, source_native = BatchNorm1d(5, **kwargs), torch.nn.BatchNorm1d(5, **kwargs)
    for source in (source_custom, source_native):  # move every buffer off its initial value
        if affine:
            with torch.no_grad():
                source.weight.normal_(generator=gen)
                source.bias.normal_(generator=gen)
        for _ in range(3):
            source(batch((7, 5), gen, torch.float32, scale=2.0, shift=1.0))
    for source, target in (
        (source_custom, torch.nn.BatchNorm1d(5, **kwargs)),
        (source_native, BatchNorm1d(5, **kwargs)),
    ):
        target.load_state_dict(source.state_dict(), strict=True)
        assert_same_state(target, source)
        x = batch((7, 5), gen, torch.float32)
        for training in (False, True):
            source.train(training)
            target.train(training)
            assert_close(target(x), source(x))


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(momentum=None, eps=1e-3), dict(affine=False), dict(track_running_stats=False), dict(bias=False)],
)
def test_parameters_buffers_and_repr_match_native(kwargs):
    """Same names, shapes, dtypes, initial values and repr as torch.nn.BatchNorm1d."""
    native, custom = torch.nn.BatchNorm1d(6, **kwargs), BatchNorm1d(6, **kwargs)
    assert repr(custom) == repr(native)
    assert custom.extra_repr() == native.extra_repr()
    for ours, theirs in ((custom.named_parameters(), native.named_parameters()),
                         (custom.named_buffers(), native.named_buffers())):
        ours, theirs = dict(ours), dict(theirs)
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert ours[name].dtype == theirs[name].dtype
            assert_close(ours[name], theirs[name])
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(custom, name) is None) == (getattr(native, name) is None), name


def test_dtype_argument_matches_native():
    native, custom = torch.nn.BatchNorm1d(3, dtype=torch.float64), BatchNorm1d(3, dtype=torch.float64)
    assert custom.weight.dtype == custom.running_var.dtype == torch.float64
    assert custom.num_batches_tracked.dtype == native.num_batches_tracked.dtype == torch.long


def test_reset_running_stats_and_parameters():
    """reset_running_stats() restores 0 / 1 / 0; reset_parameters() also weight 1, bias 0."""
    layer = BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.bias.fill_(2.0)
    layer(torch.randn(4, 3) * 5 + 1)
    layer.reset_running_stats()
    assert_close(layer.running_mean, torch.zeros(3))
    assert_close(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0
    assert_close(layer.weight.detach(), torch.full((3,), 3.0))
    layer(torch.randn(4, 3) * 5 + 1)
    layer.reset_parameters()
    assert layer.num_batches_tracked.item() == 0
    assert_close(layer.weight.detach(), torch.ones(3))
    assert_close(layer.bias.detach(), torch.zeros(3))


def test_cumulative_average_first_batch_replaces_initial_stats():
    """momentum=None: after one batch the running stats are that batch's (unbiased) stats."""
    layer = BatchNorm1d(4, momentum=None)
    x = torch.randn(10, 4) * 3 + 2
    layer(x)
    assert_close(layer.running_mean, x.mean(0))
    assert_close(layer.running_var, x.var(0, correction=1))


def test_identity_when_weight_is_std_and_bias_is_mean():
    """gamma = sqrt(batch var + eps), beta = batch mean: the layer returns its input."""
    x = torch.randn(16, 5, dtype=torch.float64) * 4 + 7
    layer = BatchNorm1d(5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.sqrt(x.var(0, correction=0) + layer.eps))
        layer.bias.copy_(x.mean(0))
    assert_close(layer(x), x)


# ----------------------------------------------------------------------------- errors


def test_rejects_4d_input_like_torch():
    with pytest.raises(ValueError, match=re.escape("expected 2D or 3D input (got 4D input)")):
        BatchNorm1d(5)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=re.escape("expected 2D or 3D input (got 1D input)")):
        BatchNorm1d(5)(torch.randn(5))


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_rejects_one_value_per_channel_when_using_batch_stats(track_running_stats):
    """Training, or eval without running stats: a single value has no variance."""
    message = "Expected more than 1 value per channel when training, got input size torch.Size([1, 5])"
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchNorm1d(5)(torch.randn(1, 5))
    layer = BatchNorm1d(5, track_running_stats=track_running_stats).eval()
    if track_running_stats:
        layer(torch.randn(1, 5))  # running stats: a batch of one is fine
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            layer(torch.randn(1, 5))
    with pytest.raises(ValueError, match=re.escape("got input size torch.Size([1, 5, 1])")):
        BatchNorm1d(5)(torch.randn(1, 5, 1))


def test_rejects_wrong_number_of_features_naming_both():
    with pytest.raises(ValueError, match=r"expected input with 5 features in dim 1 \(got 3;"):
        BatchNorm1d(5)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"expected running_mean with 3 elements.*\(got 5;"):
        batch_norm(torch.randn(4, 3), torch.zeros(5), torch.ones(5), training=True)


def test_functional_rejects_missing_running_stats_in_eval_and_bad_eps():
    with pytest.raises(ValueError, match="needs running_mean and running_var when training=False"):
        batch_norm(torch.randn(4, 3), None, torch.ones(3))
    with pytest.raises(ValueError, match=re.escape("eps must be positive during training, but got 0.0")):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match=re.escape("eps must be non-negative, but got -1.0")):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0)


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize(
    "training, with_stats", [(True, True), (True, False), (False, True)]
)  # evaluation without running statistics raises (tested above)
@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize("shape", [(8, 5), (6, 5, 3)])
def test_functional_matches_torch(training, with_stats, with_affine, shape):
    """batch_norm == F.batch_norm: output, gradients and in-place running updates."""
    gen = torch.Generator().manual_seed(0)
    x = batch(shape, gen, torch.float32, scale=50.0, shift=10.0)
    upstream = batch(shape, gen, torch.float32)
    vectors = [torch.randn(5, generator=gen) for _ in range(4)]
    vectors[1] = vectors[1].abs() + 0.1  # running_var must be positive
    results = []
    for fn in (batch_norm, F.batch_norm):
        stats = [v.clone() for v in vectors[:2]] if with_stats else [None, None]
        affine = [v.clone().requires_grad_() for v in vectors[2:]] if with_affine else [None, None]
        xg = x.clone().requires_grad_()
        out = fn(xg, *stats, *affine, training=training, momentum=0.3, eps=1e-4)
        wrt = [xg] + [a for a in affine if a is not None]
        results.append([out, *torch.autograd.grad(out, wrt, upstream), *[s for s in stats if s is not None]])
    for got, want in zip(*results, strict=True):
        assert_close(got, want)


def test_functional_eval_without_grad_matches_torch():
    """The no-grad evaluation path (one fused multiply-add) against F.batch_norm."""
    x = torch.randn(9, 4, 3) * 20 - 5
    mean, var, weight, bias = torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.randn(4)
    with torch.no_grad():
        assert_close(batch_norm(x, mean, var, weight, bias), F.batch_norm(x, mean, var, weight, bias))
        assert_close(batch_norm(x, mean, var), F.batch_norm(x, mean, var))


# ----------------------------------------------------------------------------- from scratch

FORBIDDEN = [
    r"\bF\s*\.\s*batch_norm\b",
    r"\bfunctional\s*\.\s*batch_norm\b",
    r"\btorch\s*\.\s*batch_norm\b",
    r"native_batch_norm",
    r"_batch_norm_impl_index",
    r"\b(cudnn|miopen|mkldnn)_batch_norm",
    r"\baten\s*\.\s*\w*batch_norm",
    r"\bnn\s*\.\s*BatchNorm",
    r"\bfrom\s+torch(\s*\.\s*\w+)*\s+import\b[^\n]*\b(batch_norm|BatchNorm\w*)\b",
    # the other normalizations are written from their formulas too (bnexp/nn/layer_norm, group_norm, batch_renorm)
    r"\b(F|functional|torch)\s*\.\s*(layer_norm|group_norm)\b",
    r"\bnn\s*\.\s*(LayerNorm|GroupNorm)\b",
    r"\bfrom\s+torch(\s*\.\s*\w+)*\s+import\b[^\n]*\b(layer_norm|group_norm|LayerNorm|GroupNorm)\b",
]
NATIVE = [r"\bnn\s*\.\s*BatchNorm1d\b"]
# the `native` variant's layer and its stacked form, nothing else
ALLOWED = {"nn/registry.py": NATIVE, "nn/stacked.py": NATIVE}


def code_without_strings_and_comments(source: str) -> str:
    """The source's code tokens: docstrings and comments may name torch's layer freely."""
    skip = {tokenize.STRING, tokenize.COMMENT}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return " ".join("\n" if tok.type == tokenize.NEWLINE else tok.string for tok in tokens if tok.type not in skip)


def forbidden_uses(source: str, allowed: list[str] = ()) -> list[str]:
    code = code_without_strings_and_comments(source)
    for pattern in allowed:
        code = re.sub(pattern, "<allowed>", code)
    return [m.group(0) for pattern in FORBIDDEN for m in re.finditer(pattern, code)]


def test_forbidden_call_scanner_catches_what_it_should():
    """The scanner flags real calls and imports, not mentions in docstrings or comments."""
    assert forbidden_uses("y = F.batch_norm(x, None, None, training=True)")
    assert forbidden_uses("y = torch.ops.aten.native_batch_norm(x)")
    assert forbidden_uses("from torch.nn.functional import batch_norm as bn")
    assert forbidden_uses("m = torch.nn.BatchNorm1d(3)")
    assert forbidden_uses("m = torch . nn . BatchNorm2d(3)")
    assert not forbidden_uses('"""Like torch.nn.BatchNorm1d and F.batch_norm."""  # nn.BatchNorm1d')
    assert not forbidden_uses("m = nn.BatchNorm1d(3)", NATIVE)
    assert forbidden_uses("m = nn.BatchNorm2d(3)", NATIVE)
    assert forbidden_uses("y = F.layer_norm(x, (3,))") and forbidden_uses("m = nn.GroupNorm(2, 4)")


def test_bnexp_never_calls_torch_batch_norm():
    """Nothing in bnexp (any subpackage) uses torch's normalizations, except the registry's
    `native` variant and its stacked form."""
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "layers.py" in files and PACKAGE_DIR / "nn" / "stacked.py" in files
    offences = {
        rel: found
        for path in files
        if (found := forbidden_uses(path.read_text(), ALLOWED.get(rel := path.relative_to(PACKAGE_DIR).as_posix(), [])))
    }
    assert offences == {}


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False])
def test_no_batch_norm_kernel_runs(training):
    """At run time too: no aten batch-norm op dispatches for our layer; it does for torch's."""
    seen = {}
    for name, layer in (("custom", BatchNorm1d(4)), ("native", torch.nn.BatchNorm1d(4))):
        layer.train(training)
        x = torch.randn(6, 4, 2, requires_grad=True)
        with OpRecorder() as recorder:
            layer(x).sum().backward()
        seen[name] = {op for op in recorder.ops if "batch_norm" in op}
    assert seen["native"], "the recorder must see torch's own kernel"
    assert seen["custom"] == set()


# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("affine", [True, False])
def test_formulas_with_plain_numbers_match_native(affine):
    """forward_formulas and backward_formulas called with Python numbers for n and eps (the
    layer passes cached 0-dim tensors instead): output, batch statistics and gradients."""
    native, _ = make_pair(5, momentum=1.0, affine=affine)  # momentum 1: running stats = this batch's
    gen = torch.Generator().manual_seed(0)
    x, upstream = batch((9, 5), gen, torch.float32, scale=50.0, shift=10.0), batch((9, 5), gen, torch.float32)
    weight = native.weight.detach() if affine else None
    bias = native.bias.detach() if affine else None
    y, centered, inv_std, mean, var = layers.forward_formulas(x, weight, bias, 9, native.eps)
    grads = layers.backward_formulas(upstream, centered, inv_std, weight, 9, True)
    out_n, grads_n = forward_and_grads(native, x, upstream)
    assert_close(y, out_n)
    assert_close(mean, native.running_mean)
    assert_close(var * 9 / 8, native.running_var)
    assert_close(grads[0], grads_n[0])
    if affine:
        assert_close(grads[1], grads_n[1])
        assert_close(grads[2], grads_n[2])


def test_layers_module_is_a_leaf():
    """layers.py imports torch only, nothing from bnexp: the compiled path builds on it, not the reverse."""
    import ast

    tree = ast.parse((PACKAGE_DIR / "layers.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "functools", "torch", "torch.autograd.function",
                        "bnexp.nn.layer_norm", "bnexp.nn.group_norm", "bnexp.nn.batch_renorm"}


# ----------------------------------------------------------------------------- compile path


@pytest.mark.parametrize("shape", [(8, 5), (37, 5), (48, 5), (6, 5, 3)])  # 37: a ragged row block
def test_compiled_formulas_match_native_in_eager_mode(shape):
    """bnexp.nn.compiled's forward and backward formulas, run eagerly: output, stats and grads."""
    native, _ = make_pair(5, momentum=1.0)  # momentum 1: running stats = this batch's
    gen = torch.Generator().manual_seed(0)
    x = batch(shape, gen, torch.float32, scale=50.0, shift=10.0)
    upstream = batch(shape, gen, torch.float32)
    weight, bias = native.weight.detach(), native.bias.detach()
    output, mean, inv_std, unbiased_var = compiled.forward_formulas(x, weight, bias, native.eps)
    grads = compiled.backward_formulas(upstream, x, mean, inv_std, weight)
    out_n, grads_n = forward_and_grads(native, x, upstream)
    assert_close(output, out_n)
    assert_close(mean, native.running_mean)
    assert_close(unbiased_var, native.running_var)
    for got, want in zip(grads, grads_n, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("rows", [16, 100, 1000])  # one block; ragged rest; many blocks
def test_compiled_channel_sum_equals_torch_sum(rows):
    """Summing 16-row blocks first changes only the summation order."""
    x = batch((rows, 7), torch.Generator().manual_seed(rows), torch.float64, scale=50.0, shift=10.0)
    assert_close(compiled.channel_sum(x), x.sum(0))
    x3 = x.view(rows, 7, 1).expand(rows, 7, 3)
    assert_close(compiled.channel_sum(x3), x3.sum((0, 2)))


@pytest.fixture()
def fresh_compile_cache():
    """Forget the compiled formulas, so that the test sees what it compiles itself."""
    compiled.reset()
    yield
    compiled.reset()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(60, 1100), (8, 1024, 8)])  # >= 65,536 values: compiled
def test_compiled_layer_matches_native(shape, fresh_compile_cache):
    """CompiledBatchNorm1d on inputs large enough to be compiled: train, eval, train.

    n = 60 or 64 values per channel, as in the eager parity grid: at hundreds of rows the
    float32 sums of torch's own kernel drift past the default tolerance (the large-batch
    test below compares both with float64 instead).
    """
    native, custom = make_pair(shape[1], cls=CompiledBatchNorm1d, momentum=None)
    assert isinstance(custom, BatchNorm1d) and callable(custom.compile)  # nn.Module.compile not hidden
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        custom.train(step != 3), native.train(step != 3)
        x = batch(shape, gen, torch.float32, scale=50.0, shift=10.0)
        assert_step_agrees(custom, native, x, batch(shape, gen, torch.float32))
    assert sorted(compiled.compiled_formulas()) == ["backward_formulas", "forward_formulas"]
    assert compiled.compile_error() is None  # ... and they ran compiled, not the eager fallback
    x = batch(shape, gen, torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(custom(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    dict(affine=False), dict(bias=False), dict(track_running_stats=False), dict(dtype=torch.float64),
])
def test_compiled_layer_options_match_native(kwargs):
    """The compiled path without weight, without bias, without running stats, in float64."""
    native, custom = make_pair(1100, cls=CompiledBatchNorm1d, **kwargs)
    gen = torch.Generator().manual_seed(0)
    dtype = kwargs.get("dtype", torch.float32)
    for _ in range(2):
        x = batch((60, 1100), gen, dtype, scale=5.0, shift=2.0)
        assert_step_agrees(custom, native, x, batch((60, 1100), gen, dtype))


@pytest.mark.slow
def test_compiled_layer_takes_strided_input_and_a_plain_sum(fresh_compile_cache):
    """A transposed (non-contiguous) input, and .sum()'s expanded gradient (all strides 0)."""
    native, custom = make_pair(1100, cls=CompiledBatchNorm1d)
    gen = torch.Generator().manual_seed(0)
    x = batch((1100, 60), gen, torch.float32, scale=5.0, shift=2.0).t()
    assert not x.is_contiguous()
    assert_step_agrees(custom, native, x, batch((60, 1100), gen, torch.float32))
    grads = []
    for layer in (custom, native):
        xg = x.detach().requires_grad_()
        grads.append(torch.autograd.grad(layer(xg).sum(), [xg, layer.weight, layer.bias]))
    for got, want in zip(*grads, strict=True):
        assert_close(got, want)


COMPILE_WITHOUT_COMPILER = """
import warnings, torch
from bnexp.nn.compiled import CompiledBatchNorm1d
torch.manual_seed(0)
native, custom = torch.nn.BatchNorm1d(1100), CompiledBatchNorm1d(1100)
x = torch.randn(60, 1100) * 5 + 2
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for layer in (native, custom):
        xg = x.clone().requires_grad_()
        layer.out = layer(xg)
        layer.grads = torch.autograd.grad(layer.out.sum(), [xg, layer.weight, layer.bias])
torch.testing.assert_close(custom.out, native.out)
for got, want in zip(custom.grads, native.grads):
    torch.testing.assert_close(got, want)
torch.testing.assert_close(custom.running_var, native.running_var)
print(len(caught), caught[0].message)
"""


def test_compile_without_a_compiler_warns_once_and_runs_eagerly(tmp_path):
    """No C++ compiler: one RuntimeWarning naming the cause, then the same formulas, eagerly."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing cached to fall back on
    result = subprocess.run([sys.executable, "-c", COMPILE_WITHOUT_COMPILER], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 CompiledBatchNorm1d: torch.compile failed, running the "
                                    "formulas eagerly instead (InductorError: InvalidCxxCompiler")


def test_compile_leaves_small_inputs_to_the_eager_path(fresh_compile_cache):
    """Under 65,536 values a compiled call costs more than the eager layer: nothing compiles."""
    native, custom = make_pair(100, cls=CompiledBatchNorm1d)
    gen = torch.Generator().manual_seed(0)
    assert_step_agrees(custom, native, batch((60, 100), gen, torch.float32), batch((60, 100), gen, torch.float32))
    assert compiled.compiled_formulas() == []


def test_reset_forgets_compiled_formulas_and_compile_failures():
    """reset() is the public way to start over: nothing compiled, no failure remembered."""
    compiled.reset()
    assert compiled.compiled_formulas() == [] and compiled.compile_error() is None


@pytest.mark.slow
def test_compiled_layer_as_accurate_as_native_at_large_batch(fresh_compile_cache):
    """At n = 1024 float32 the compiled path drifts from the float64 truth no more than torch."""
    torch.manual_seed(0)
    x = torch.randn(1024, 600) * 50 + 10
    upstream = torch.randn(1024, 600)
    native, custom = make_pair(600, cls=CompiledBatchNorm1d)
    ours, theirs = errors_against_float64([custom, native], x, upstream)
    assert sorted(compiled.compiled_formulas()) == ["backward_formulas", "forward_formulas"]
    for mine, torchs in zip(ours, theirs, strict=True):
        assert mine <= torchs
