"""Check `outlier_study.quant.gptq` against llm-compressor's GPTQ on the linears of a tiny model.

llm-compressor cannot live in the project's environment (it pins an older transformers), so this one-off
check runs with it installed into a folder of its own and put first on the path:

    pip install --no-deps --target /tmp/llmc llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \\
        transformers==5.17.0 huggingface_hub==1.33.0 loguru
    PYTHONPATH=/tmp/llmc python scripts/gptq_reference.py

Both sides get the same weights, the same Hessian (the inputs of every linear of tiny-llama on random
tokens), the same per-row or per-group steps (RTN's, max|w| / qmax) and zero points of 0. The one
difference of grid, llm-compressor's asymmetric integer range [-2^(b-1), 2^(b-1)-1] against the
project's symmetric ±qmax, is removed by giving compressed-tensors the symmetric range. What remains is
arithmetic: llm-compressor factors the Hessian in float32, the project in float64, so a few weights may
land one level apart. Prints, per setting, the share of identical weights, the largest difference in
levels, and the two layer-output errors tr(ΔW H ΔWᵀ) relative to RTN's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))


def main() -> int:
    try:
        import compressed_tensors.quantization.lifecycle.forward as ct_forward
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError as err:
        print(f"llm-compressor is not importable ({err}); see this script's docstring", file=sys.stderr)
        return 2
    from outlier_study.adapters.linears import weight_out_in
    from outlier_study.quant.fake import grid_scale, qmax, quantize
    from outlier_study.quant.gptq import GPTQSettings, gptq_quantize
    from outlier_study.quant.layerwise import hessians
    from tests.helpers import load_named

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lm = load_named("tiny-llama", Path(tempfile.mkdtemp()))
    linears = [m for _, _, m in lm.adapter.linears(lm.model)]
    ids = torch.randint(0, lm.model.config.vocab_size, (8, 64))
    with hessians(linears) as log, torch.inference_mode():
        lm.model(input_ids=ids, use_cache=False)

    def symmetric_range(args: object, device: object) -> tuple[torch.Tensor, torch.Tensor]:
        q = float(qmax(args.num_bits))  # type: ignore[attr-defined]
        return torch.tensor(-q), torch.tensor(q)

    ct_forward.calculate_range = symmetric_range  # the project's symmetric grid
    print("setting                       identical   max|Δlevel|   err/RTN ours   err/RTN llm-compressor")
    for bits, group, act_order in [
        (4, None, False),
        (4, None, True),
        (4, 16, False),
        (4, 16, True),
        (3, 32, True),
    ]:
        same = total = 0
        worst = 0.0
        ours_err = ref_err = rtn_err = 0.0
        for module in linears:
            w, h = weight_out_in(module).detach().float(), log.hessian(module).float()
            settings = GPTQSettings(damp=0.01, block_size=32, act_order=act_order)
            ours = gptq_quantize(w, h, bits, group, settings).weight
            g = w.shape[1] if group is None else group
            amax = w.reshape(w.shape[0], -1, g).abs().amax(dim=-1)
            scale = grid_scale(amax, bits)
            args = QuantizationArgs(
                num_bits=bits,
                type="int",
                symmetric=True,
                strategy="channel" if group is None else "group",
                group_size=group,
                actorder="weight" if act_order else None,
            )
            ref, _, _ = quantize_weight(
                w[None].clone(),
                h[None].clone(),
                scale[None],
                torch.zeros_like(scale)[None],
                None,
                args,
                32,
                0.01,
            )
            ref = ref[0]
            steps = scale.repeat_interleave(g, dim=1)
            same += int((ours == ref).sum())
            total += ours.numel()
            worst = max(worst, float(((ours - ref) / steps).abs().max()))
            h64 = h.double()

            def err(q: torch.Tensor, w: torch.Tensor = w, h64: torch.Tensor = h64) -> float:
                d = (w - q).double()
                return float(torch.einsum("ij,jk,ik->", d, h64, d))

            rtn = quantize(w, bits, group_size=group)
            ours_err, ref_err, rtn_err = ours_err + err(ours), ref_err + err(ref), rtn_err + err(rtn)
        label = (
            f"W{bits} {'per-channel' if group is None else f'g{group}'}{' act-order' if act_order else ''}"
        )
        print(
            f"{label:28s} {same / total:9.4%}   {worst:11.0f}   {ours_err / rtn_err:12.4f}"
            f"   {ref_err / rtn_err:12.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
