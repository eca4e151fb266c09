"""Row-parallel outputs summed in the norm after them (layers/linear.py `defer_reduce`, layers/layernorm.py
`reduce`): which layers defer their all-reduce, that the norm then takes the sum (one fused kernel where
the custom all-reduce offers it, else all_reduce and the norm), and that AWQ layers keep the choice.
End to end under gloo (TP=2 and 4 equal to one rank): tests/test_tensor_parallel.py."""
import torch

import nanovllm.layers.layernorm as layernorm
from nanovllm.layers.awq import AWQLinear
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import Linear, defer_reduce


def row_parallel(bias=False, in_features=16):
    layer = Linear(in_features, 8, bias=bias, tp_dim=1)   # built without a group (one rank): say two
    layer.tp_size = 2
    layer.weight.data.normal_()   # torch.empty may hold NaNs
    return layer


def test_defer_reduce_only_on_row_parallel_layers_without_bias():
    assert not defer_reduce(Linear(16, 8, tp_dim=1))          # one rank: nothing to sum
    assert not defer_reduce(Linear(16, 8, tp_dim=0))          # column parallel: no sum
    biased = row_parallel(bias=True)
    assert not defer_reduce(biased) and biased.reduce_output  # the bias is added once, after the sum
    layer = row_parallel()
    assert defer_reduce(layer) and not layer.reduce_output
    x = torch.randn(3, 16)   # this rank's slice of the input features
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))   # the partial sum, as is


def test_awq_layer_keeps_a_deferred_sum():
    layer = row_parallel(in_features=128)   # AWQ takes whole groups of input features
    defer_reduce(layer)
    assert AWQLinear.replacing(layer, 128, "down_proj").reduce_output is False
    assert AWQLinear.replacing(row_parallel(in_features=128), 128, "down_proj").reduce_output is True


def test_norm_takes_the_sum_fused_or_not(monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(8, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(4, 8), torch.randn(4, 8)
    fused_calls = []

    def fused(x_, residual_, weight, eps):   # the custom all-reduce's kernel, where it applies
        fused_calls.append((x_, residual_, weight, eps))
        return "normed", "residual"
    monkeypatch.setattr(layernorm, "all_reduce_add_rmsnorm", fused)
    assert norm(x, residual.clone(), reduce=True) == ("normed", "residual")
    assert fused_calls[0][2] is norm.weight and fused_calls[0][3] == 1e-6

    # No fused kernel for these tensors: all_reduce (here two equal ranks: 2x) and then the norm.
    monkeypatch.setattr(layernorm, "all_reduce_add_rmsnorm", lambda *a: None)
    monkeypatch.setattr(layernorm, "all_reduce", lambda t: 2 * t)
    got, got_residual = norm(x.clone(), residual.clone(), reduce=True)
    want, want_residual = norm(2 * x, residual.clone())
    assert torch.equal(got, want) and torch.equal(got_residual, want_residual)
    assert torch.equal(norm(x.clone(), reduce=True), norm(2 * x))      # no residual (never fused)
    assert torch.equal(norm(x.clone(), residual.clone())[0], norm(x.clone(), residual.clone(), reduce=False)[0])
