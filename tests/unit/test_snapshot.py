"""The background writer's snapshot: a copy the loop can no longer change, bit for bit, written into
the buffers of the previous snapshot when their layout matches (one memcpy per plain CPU tensor that
torch would split over its threads), by torch's own copy otherwise."""

from __future__ import annotations

import pytest
import torch

from daemon.ckpt.writer import snapshot

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


def filled(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=generator).to(dtype)


def state_of(seed: int) -> dict:
    return {
        "weights": {str(dtype): filled(dtype, (7, 5), seed) for dtype in DTYPES},
        "scalar": torch.tensor(float(seed)),
        "empty": torch.empty(0, 3),
        "big": torch.randn(300_000, generator=torch.Generator().manual_seed(seed)),  # above torch's split
        "complex": torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)),
        "rows": [filled(torch.int64, (3,), seed), 3, "text"],
        "step": seed,
    }


def same_bits(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_snapshot_into_the_previous_ones_buffers_is_the_state_bit_for_bit_and_reuses_them():
    first = snapshot(state_of(1))
    pointers = {key: first["weights"][key].data_ptr() for key in first["weights"]} | {"big": first["big"].data_ptr()}
    live = state_of(2)

    second = snapshot(live, reuse=first)

    assert same_bits(second, live)
    assert {key: second["weights"][key].data_ptr() for key in second["weights"]} | {
        "big": second["big"].data_ptr()
    } == pointers
    live["big"].add_(1.0)  # the loop trains on: the snapshot keeps what was taken
    live["weights"][str(torch.float32)].zero_()
    assert same_bits(second, state_of(2))


def test_values_the_bytes_do_not_hold_are_copied_by_value():
    source = torch.randn(200, 200, dtype=torch.complex64)  # above torch's split, like every tensor below
    conjugated = source.conj()  # lazy: the bytes are the unconjugated values
    negated = torch.randn(200, 200)._neg_view()
    reuse = snapshot({"conj": conjugated.resolve_conj(), "neg": negated.resolve_neg()})

    copied = snapshot({"conj": conjugated, "neg": negated}, reuse=reuse)

    assert torch.equal(copied["conj"], conjugated.resolve_conj())
    assert torch.equal(copied["neg"], negated.resolve_neg())


@pytest.mark.parametrize("layout", ["transposed", "strided slice"])
def test_a_tensor_not_in_one_block_is_copied_with_its_layout(layout):
    base = torch.randn(400, 300)
    source = base.t() if layout == "transposed" else base[:, ::2]
    reuse = snapshot({"x": source})

    copied = snapshot({"x": source * 2}, reuse=reuse)

    assert torch.equal(copied["x"], source * 2)


@pytest.mark.parametrize(
    "make",
    [lambda: torch.nn.Parameter(torch.randn(5, 5)), lambda: torch.randn(300, 300).requires_grad_()],
    ids=["a parameter", "a plain tensor above torch's split"],
)
def test_a_tensor_that_requires_grad_is_copied_detached(make):
    parameter = make()
    reuse = snapshot({"p": parameter})
    with torch.no_grad():
        parameter.mul_(3)

    copied = snapshot({"p": parameter}, reuse=reuse)

    assert not copied["p"].requires_grad and torch.equal(copied["p"], parameter.detach())
