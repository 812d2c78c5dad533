"""Perplexity: checked against an independent float64 log-softmax over a separate plain forward."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from outlier_study.measure import perplexity
from outlier_study.measure.forward import logits_forward
from outlier_study.measure.perplexity import Perplexity, evaluate_perplexity
from outlier_study.models.loader import LoadedModel
from tests.helpers import make_cfg


def reference_nll(lm: LoadedModel, ids: torch.Tensor) -> float:
    """Summed NLL from one separate plain `lm.model(ids)` call, log-softmax and gather in float64."""
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[:, :-1].double(), dim=-1)
    return -float(logp.gather(-1, ids[:, 1:, None]).sum())


@pytest.fixture()
def windows() -> torch.Tensor:
    return torch.randint(0, 256, (5, 20), generator=torch.Generator().manual_seed(1))


@contextmanager
def zeroed_lm_head(lm: LoadedModel) -> Iterator[None]:
    """lm_head weight (and bias) temporarily zero: uniform logits; restored even if the test fails."""
    head = lm.model.get_output_embeddings()
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def test_matches_independent_log_softmax(tiny: LoadedModel, windows: torch.Tensor) -> None:
    result = evaluate_perplexity(tiny, windows, batch_size=2, progress=False)
    expected = reference_nll(tiny, windows)
    assert result.n_tokens == 5 * 19
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected / (5 * 19)), rel=1e-6)
    assert result.mean_nll == pytest.approx(result.nll_sum / result.n_tokens)


def test_batch_size_does_not_change_result(tiny: LoadedModel, windows: torch.Tensor) -> None:
    one = evaluate_perplexity(tiny, windows, batch_size=1, progress=False)
    three = evaluate_perplexity(tiny, windows, batch_size=3, progress=False)  # batches of 3 and 2
    assert three.n_tokens == one.n_tokens == 95
    assert three.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)


def test_row_chunks_do_not_change_result(
    tiny: LoadedModel, windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 logit rows per cross-entropy call: 19 predicted rows per window become 5 chunks, the last ragged.
    vocab = tiny.model.config.vocab_size
    monkeypatch.setitem(perplexity._CHUNK_ELEMENTS, "cpu", 4 * vocab)
    result = evaluate_perplexity(tiny, windows, batch_size=5, progress=False)
    assert result.n_tokens == 95
    assert result.nll_sum == pytest.approx(reference_nll(tiny, windows), rel=1e-6)


def test_half_logits_are_upcast_before_log_softmax(tiny: LoadedModel, windows: torch.Tensor) -> None:
    # bfloat16 logits (as a bf16 model returns them) must be scored in float32: a bf16 log-softmax is off
    # by ~1e-3 relative, the float32 one matches a float64 reference on the same bf16 logits.
    handle = tiny.model.get_output_embeddings().register_forward_hook(lambda m, i, out: out.bfloat16())
    try:
        assert logits_forward(tiny, windows[:1]).dtype == torch.bfloat16
        result = evaluate_perplexity(tiny, windows, batch_size=5, progress=False)
        expected = reference_nll(tiny, windows)
    finally:
        handle.remove()
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)


def test_logits_forward_is_the_plain_forward(tiny: LoadedModel, windows: torch.Tensor) -> None:
    logits = logits_forward(tiny, windows[:2])
    with torch.no_grad():
        plain = tiny.model(windows[:2]).logits
    assert logits.shape == (2, 20, tiny.model.config.vocab_size)
    torch.testing.assert_close(logits, plain)


def test_uniform_logits_give_vocab_size(tiny: LoadedModel, windows: torch.Tensor) -> None:
    before = evaluate_perplexity(tiny, windows[:2], batch_size=2, progress=False)
    vocab = tiny.model.get_output_embeddings().weight.shape[0]
    with zeroed_lm_head(tiny):
        uniform = evaluate_perplexity(tiny, windows[:2], batch_size=2, progress=False)
    assert uniform.ppl == pytest.approx(vocab, rel=1e-4)
    # The model is restored bit-exactly for the other tests sharing this session fixture.
    assert evaluate_perplexity(tiny, windows[:2], batch_size=2, progress=False).nll_sum == before.nll_sum


def test_confident_correct_predictions_give_closed_form_ppl(tiny: LoadedModel, windows: torch.Tensor) -> None:
    # A forward hook makes lm_head output a margin m at each true next token and 0 elsewhere, so every
    # predicted token has NLL log(1 + (V-1)·e^-m); Gemma3 soft-caps the margin to cap·tanh(m/cap).
    margin = 10.0

    def confident(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros_like(out)
        logits[:, :-1].scatter_(-1, windows[:, 1:, None], margin)
        return logits

    handle = tiny.model.get_output_embeddings().register_forward_hook(confident)
    try:
        result = evaluate_perplexity(tiny, windows, batch_size=len(windows), progress=False)
    finally:
        handle.remove()
    cap = getattr(tiny.model.config, "final_logit_softcapping", None)
    m = cap * math.tanh(margin / cap) if cap else margin
    vocab = tiny.model.config.vocab_size
    assert result.n_tokens == 95
    assert result.ppl == pytest.approx(1.0 + (vocab - 1) * math.exp(-m), rel=1e-6)
    assert 1.0 < result.ppl < 1.05


def test_non_finite_nll_is_returned_not_raised(tiny: LoadedModel, windows: torch.Tensor) -> None:
    head = tiny.model.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.fill_(float("nan"))
        result = evaluate_perplexity(tiny, windows[:1], progress=False)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert result.n_tokens == 19
    assert math.isnan(result.ppl)


def test_ppl_overflow_and_empty_are_not_errors() -> None:
    assert Perplexity(nll_sum=1e6, n_tokens=1).ppl == math.inf
    assert Perplexity(nll_sum=math.inf, n_tokens=3).ppl == math.inf
    assert math.isnan(Perplexity(nll_sum=0.0, n_tokens=0).ppl)
    assert Perplexity(nll_sum=2 * math.log(5.0), n_tokens=2).ppl == pytest.approx(5.0)


def test_rejects_windows_without_a_predicted_token(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="seq_len >= 2"):
        evaluate_perplexity(tiny, torch.zeros((2, 1), dtype=torch.long), progress=False)


@pytest.mark.real
def test_smollm2_wikitext_perplexity(smollm2: LoadedModel, wikitext: Path) -> None:
    from outlier_study.data import build_windows

    cfg = make_cfg(
        "dataset=wikitext2", f"dataset.path={wikitext}", "dataset.seq_len=128", "dataset.n_windows=2"
    )
    ids = build_windows(cfg.dataset, smollm2.tokenizer).input_ids
    result = evaluate_perplexity(smollm2, ids, batch_size=2, progress=False)
    assert result.n_tokens == 2 * 127
    assert math.isfinite(result.ppl)
    assert 1.0 < result.ppl < smollm2.model.config.vocab_size
    assert result.nll_sum == pytest.approx(reference_nll(smollm2, ids), rel=1e-5)
    print(f"SmolLM2-135M WikiText-2 token ppl (2 x 128): {result.ppl:.4f}")
