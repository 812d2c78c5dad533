"""Perplexity with RTN and GPTQ weights, W4A16 and W4A8, per method: the cells of
`make quant-gptq` without the per-job diagnostics, and GPTQ run once per method for both settings.

GPTQ's weights do not depend on the activation bits (it calibrates with activations in full
precision), so W4A16-GPTQ and W4A8-GPTQ share one GPTQ run. Each cell uses the pieces the quant
experiment uses: the method's `apply`, `quantize_weights`, `fake_quant` and `evaluate_perplexity`,
with the same windows, so each perplexity equals that job's `ppl`.

    python scripts/gptq_grid.py model=smollm2-135m dataset=wikitext2 dataset.path=PATH/wiki.test.raw \\
        dataset.n_windows=10 dataset.seq_len=512
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))

METHODS_RUN = ("none", "smoothquant", "rotation")
SETTINGS = ("w4a16", "w4a8")


def main(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from outlier_study.config import CONF_DIR
    from outlier_study.config.schema import register_configs
    from outlier_study.data import build_windows, load_corpus
    from outlier_study.data.windows import calibration_windows
    from outlier_study.interventions.treatment import Inputs
    from outlier_study.measure.perplexity import evaluate_perplexity
    from outlier_study.models.loader import load_model
    from outlier_study.quant.fake import fake_quant, spec_from_config
    from outlier_study.quant.methods import METHODS
    from outlier_study.quant.weights import WeightJob, quantize_weights
    from outlier_study.validate import typed_config

    register_configs()

    def config(*extra: str) -> object:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return typed_config(
                compose(config_name="config", overrides=["experiment=quant", *overrides, *extra])
            )

    base = config()
    lm = load_model(base.model, str(base.dtype), str(base.device), Path(base.paths.model_cache))
    windows = build_windows(base.dataset, lm.tokenizer, load_corpus(base.dataset))
    batch = int(base.dataset.batch_size)
    print(f"{'method':12s} {'setting':12s} {'ppl':>10s} {'weights s':>9s} {'eval s':>8s}", flush=True)
    for method_name in METHODS_RUN:
        cfg = config(f"method={method_name}", "quant=w4a16", "quant.weights=gptq")
        method = METHODS.get(method_name)
        calib = None
        if method.calibrated:
            calib = calibration_windows(windows, int(cfg.method.calib_windows)).input_ids
        gptq_calib = calibration_windows(
            windows, int(cfg.quant.gptq.calib_windows), "quant.gptq.calib_windows"
        )
        inputs = Inputs(lm, cfg.method, cfg.threshold, calib, batch, False)
        with method.apply(inputs):
            cached: dict[str, tuple[object, float]] = {}
            for weights in ("rtn", "gptq"):
                for setting in SETTINGS:
                    spec = spec_from_config(config(f"quant={setting}", f"quant.weights={weights}").quant)
                    if weights not in cached:
                        started = time.perf_counter()
                        job = WeightJob(lm, spec, cfg.quant.gptq, gptq_calib.input_ids, batch, False)
                        cached[weights] = (quantize_weights(job)[0], time.perf_counter() - started)
                    quantized, seconds = cached[weights]
                    started = time.perf_counter()
                    with fake_quant(lm, spec, quantized):  # type: ignore[arg-type]
                        ppl = evaluate_perplexity(lm, windows.input_ids, batch, False).ppl
                    took = time.perf_counter() - started
                    print(
                        f"{method_name:12s} {spec.label:12s} {ppl:10.3f} {seconds:9.0f} {took:8.0f}",
                        flush=True,
                    )
                del cached[weights]


if __name__ == "__main__":
    main(sys.argv[1:])
