"""The KV-cache ONNX graph on a tiny random Llama: its interface, parity with PyTorch through the prefill and 32
decode steps, and generation over onnxruntime (greedy, left-padded batches, sampling)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from llmpress.compress.quant import install_act_quant
from llmpress.export.generate import OrtGenerator, Sampling, onnx_session
from llmpress.export.onnx import check_parity, noise_floor

VOCAB = 256


@pytest.fixture(scope="module")
def tiny(tiny_onnx) -> LlamaForCausalLM:
    return tiny_onnx[0]


@pytest.fixture(scope="module")
def graph(tiny_onnx) -> str:
    return str(tiny_onnx[1] / "model.onnx")


@pytest.fixture(scope="module")
def generator(graph) -> OrtGenerator:
    return OrtGenerator(onnx_session(graph, threads=1))


def test_graph_has_cache_inputs_and_outputs(graph) -> None:
    session = onnx_session(graph)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]


def test_parity_through_prefill_and_32_decode_steps(tiny, graph) -> None:
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    parity = check_parity(tiny, graph, ids, decode_steps=32)
    assert parity.decode_steps == 32
    assert parity.max_abs_diff < 1e-4
    assert parity.argmax_agreement == 1.0
    assert parity.greedy_identical
    assert 0 < parity.noise_max_abs_diff < 1e-4  # weights-only: one-ulp input noise barely moves the logits


def test_noise_floor_of_an_activation_rounding_model_is_its_quantization_noise(tiny) -> None:
    """Per-token 8-bit activation rounding turns one-ulp input noise into logit changes far above the gate's bound
    (measured: max 0.02 against 3e-6 without rounding; 8M roundings here, of which some flip): the reason the gate
    judges such graphs against the floor (llmpress.gate)."""
    ids = torch.randint(0, VOCAB, (32, 256), generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(tiny)
    smooth_max, smooth_mean = noise_floor(model, ids)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear) and layer is not model.lm_head:
            install_act_quant(layer, bits=8)
    rounding_max, rounding_mean = noise_floor(model, ids)
    assert smooth_max < 1e-4
    assert rounding_max > 1e-3  # above the gate's default bound: no implementation could meet it
    assert rounding_max > 1000 * smooth_max
    assert rounding_mean > 10 * smooth_mean


def test_cache_grows_by_one_token_per_step(generator) -> None:
    ids = np.array([[5, 6, 7]])
    logits, cache = generator.forward(ids, np.ones_like(ids), generator.empty_cache(1))
    assert logits.shape == (1, 3, VOCAB)
    assert {v.shape for v in cache.values()} == {(1, 2, 3, 16)}
    logits, cache = generator.forward(np.array([[8]]), np.ones((1, 4), dtype=np.int64), cache)
    assert logits.shape == (1, 1, VOCAB)
    assert {v.shape for v in cache.values()} == {(1, 2, 4, 16)}


def test_greedy_generation_equals_transformers_generate(tiny, generator) -> None:
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = tiny.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = generator.generate(ids.numpy(), max_new_tokens=16)
    np.testing.assert_array_equal(got, expected.numpy())


def test_left_padded_batch_generates_what_each_prompt_does_alone(generator) -> None:
    short, long = np.array([[9, 10, 11]]), np.array([[1, 2, 3, 4, 5, 6]])
    batch = np.array([[0, 0, 0, 9, 10, 11], [1, 2, 3, 4, 5, 6]])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    together = generator.generate(batch, max_new_tokens=8, attention_mask=mask)
    np.testing.assert_array_equal(together[0, 3:], generator.generate(short, max_new_tokens=8)[0])
    np.testing.assert_array_equal(together[1], generator.generate(long, max_new_tokens=8)[0])


def test_sampling_is_seeded_and_narrow_sampling_is_greedy(generator) -> None:
    ids = np.array([[3, 1, 4, 1, 5]])
    a = generator.generate(ids, 12, Sampling(temperature=1.0, seed=7))
    b = generator.generate(ids, 12, Sampling(temperature=1.0, seed=7))
    np.testing.assert_array_equal(a, b)
    greedy = generator.generate(ids, 12)
    np.testing.assert_array_equal(generator.generate(ids, 12, Sampling(temperature=1.0, top_k=1, seed=1)), greedy)
    np.testing.assert_array_equal(generator.generate(ids, 12, Sampling(temperature=0.7, top_p=1e-6, seed=1)), greedy)
    draws = {tuple(generator.generate(ids, 6, Sampling(temperature=5.0, seed=s))[0]) for s in range(8)}
    assert len(draws) > 1  # a hot temperature really samples


def test_eos_stops_generation(generator) -> None:
    ids = np.array([[3, 1, 4]])
    greedy = generator.generate(ids, 10)
    eos = int(greedy[0, 5])  # the third generated token
    out = generator.generate(ids, 10, eos_token_id=eos)
    assert out.shape[1] == 6 and out[0, -1] == eos


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"temperature": -1}, "temperature"), ({"temperature": 1, "top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_settings_are_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        Sampling(**settings)


def test_a_graph_without_cache_is_refused(tmp_path) -> None:
    class NoCache(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids.float() * 2

    path = tmp_path / "plain.onnx"
    torch.onnx.export(NoCache(), (torch.ones(1, 2, dtype=torch.long),), str(path), input_names=["input_ids"],
                      output_names=["logits"], dynamo=True)  # fmt: skip
    with pytest.raises(ValueError, match="not an llmpress KV-cache graph"):
        OrtGenerator(onnx_session(path))
