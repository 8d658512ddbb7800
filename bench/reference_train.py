"""The 2023 reference trainer configuration, on our base (tiny or the embedded SmolLM2) and data: the "reference" side of the CPU training benchmark.

    python bench/train_side.py reference RUN_DIR OUT.json      # (how bench/run.py runs it, instrumented)

A standalone TRL `SFTTrainer` script, because two parts of the reference configuration cannot be expressed in our
`Config` (on purpose: they are defects, FINDINGS.md): pad = EOS, and loss on the prompt tokens. It reads RUN_DIR's
`params.yaml`, `models/base/` and `data/final/{train,val}.jsonl`, trains and writes `RUN_DIR/models/adapter/`.

Shared with our `train` stage (from the same `params.yaml`, so both sides differ only where the reference did):
the base model and tokenizer files, the training rows (the same over-long rows dropped: `fit_length`), the chat
template (the same token sequences), LoRA (r, alpha, dropout, targets, modules_to_save), learning rate, schedule,
warmup, weight decay, grad clipping, optimizer, epochs / max_steps, max_length, precision (`run_dtype`, as ours: bf16
for a real base on a CPU with native bf16, fp32 for `tiny`; TRL 1.x would otherwise default to bf16 autocast over fp32
weights, 3x slower here), seed, checkpoint every `train.save_steps`, dvclive logging.

The reference's own settings (its params.yaml and train.py, github.com/alex000kim/ML-Pipeline-With-DVC-SkyPilot-HuggingFace):
- per_device_train_batch_size 8 (eval batch: the transformers default, 8);
- eval_strategy steps, eval_steps 10 (FINDINGS: 75% of its GPU time went to evaluation);
- group_by_length (transformers 5: `train_sampling_strategy="group_by_length"`); no packing;
- `tokenizer.pad_token = tokenizer.eos_token`, with the collator TRL 0.7 used by default, transformers'
  `DataCollatorForLanguageModeling(mlm=False)`, which sets labels equal to the pad id to -100: every end-of-turn
  token (= EOS = pad) is left out of the loss. `EosMaskingCollator` reproduces that on top of TRL 1.x's collator;
- loss on every token, prompts included (a plain language-modeling loss: `assistant_only_loss` and
  `completion_only_loss` False).
Left out: `load_best_model_at_end` (it would pick the adapter by eval loss on the very val set both sides are
measured on) and the reference's lr 2e-4 constant / 2 epochs (the benchmark compares at our lr and epochs).
"""
from __future__ import annotations
import json, os, sys
from pathlib import Path

REFERENCE = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "eval_strategy": "steps", "eval_steps": 10,
             "train_sampling_strategy": "group_by_length", "packing": False, "assistant_only_loss": False,
             "completion_only_loss": False}


# With `model.quantization: 4bit` (bench/gpu.py), the 2023 QLoRA recipe where it differs from ours: nf4 without
# double quantization and an fp16 compute dtype (under bf16 autocast), LoRA on peft's Llama default (q_proj, v_proj) with
# fp32 adapters, no gradient checkpointing, eager attention (SDPA came to Llama in transformers 4.36); and what TRL 0.7
# did that TRL 1.x does not: k-bit preparation of the model, and a loss from the full logits (`Loss2023Trainer`)
GPU_2023 = {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                             "bnb_4bit_compute_dtype": "float16"},
            "target_modules": ["q_proj", "v_proj"], "attn": "eager"}


class EosMaskingCollator:
    "TRL's collator, then labels == pad id (= EOS) set to -100, as transformers' LM collator did in 2023."
    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        self.inner, self.pad = DataCollatorForLanguageModeling(pad_token_id=pad_token_id), pad_token_id
    def __call__(self, examples):
        out = self.inner(examples)
        out["labels"][out["input_ids"] == self.pad] = -100
        return out


def _loss_2023_trainer():
    from transformers import Trainer
    from trl import SFTTrainer
    class Loss2023Trainer(SFTTrainer):
        "The 2023 loss on a 4-bit run: the model's own forward with labels, full [batch, length, vocab] logits (TRL 1.x's fused LM head never builds them)."
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    return Loss2023Trainer


def main(run_dir: str | Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from llm_pipeline.config import Paths, load_params
    from llm_pipeline.data import read_jsonl
    from llm_pipeline.model import base_source, run_dtype
    from llm_pipeline.train import fit_length, global_step_dvclive_callback, lora_config, token_lengths, use_dvclive
    run_dir = Path(run_dir).resolve()
    cfg, paths = load_params(run_dir/"params.yaml"), Paths(run_dir)
    t = cfg.train
    src, kw = base_source(cfg, paths)  # models/base, or a local base's own folder
    tok = AutoTokenizer.from_pretrained(src, padding_side="right", **kw)
    # the same rows as ours: token lengths under the real tokenizer, over-long rows dropped the same way
    train_rows, rep = fit_length(read_jsonl(paths.final("train")), token_lengths(read_jsonl(paths.final("train")), tok), t.max_length, t.overlong)
    val_rows, _ = fit_length(read_jsonl(paths.final("val")), token_lengths(read_jsonl(paths.final("val")), tok), t.max_length, t.overlong)
    tok.pad_token = tok.eos_token  # the reference: pad = EOS
    dtype = run_dtype(cfg)  # as ours: so the comparison is of the recipes, not of the precision
    qlora = cfg.model.quantization == "4bit"  # bench/gpu.py: the 2023 QLoRA recipe (its --device cpu smoke run too)
    cuda = torch.cuda.is_available()
    if qlora:
        from transformers import BitsAndBytesConfig
        kw = {**kw, "quantization_config": BitsAndBytesConfig(**GPU_2023["quantization"]), "attn_implementation": GPU_2023["attn"]}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map={"": 0 if cuda else "cpu"}, **kw)
    model.config.use_cache = False
    if qlora:  # TRL 0.7 prepared a k-bit model itself (norms, embeddings and head to fp32); TRL 1.x leaves it to the caller
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    shared = {k: getattr(t, k) for k in ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                                         "weight_decay", "max_grad_norm", "optim", "max_length", "save_steps", "logging_steps",
                                         "gradient_checkpointing")}
    lora = lora_config(cfg)
    Loss2023Trainer = _loss_2023_trainer()
    if qlora:
        shared["gradient_checkpointing"] = False
        lora.target_modules = set(GPU_2023["target_modules"])
    ref = {**REFERENCE, "per_device_train_batch_size":  # bench/gpu.py halves it after an OOM
           int(os.environ.get("LLM_PIPELINE_BENCH_REFERENCE_BATCH", REFERENCE["per_device_train_batch_size"]))}
    args = SFTConfig(output_dir=str(run_dir/"checkpoints"), **shared, **ref, save_strategy="steps", save_total_limit=1,
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     seed=cfg.seed, data_seed=cfg.seed, use_cpu=not cuda, report_to=["dvclive"], logging_first_step=True,
                     dataloader_num_workers=0)
    trainer = (Loss2023Trainer if qlora else SFTTrainer)(model=model, args=args, processing_class=tok, peft_config=lora,
                         train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in train_rows]),
                         eval_dataset=Dataset.from_list([{"messages": r["messages"]} for r in val_rows]),
                         data_collator=EosMaskingCollator(tok.pad_token_id))
    if qlora:  # TRL 1.x casts a 4-bit model's adapters to bf16; TRL 0.7 on the reference's transformers kept them in fp32
        for p in trainer.model.parameters():
            if p.requires_grad: p.data = p.data.float()
    use_dvclive(trainer, global_step_dvclive_callback(run_dir/"dvclive", None))  # logging like ours, into RUN_DIR
    result = trainer.train()
    trainer.model.save_pretrained(run_dir/"models"/"adapter")
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
            "final_eval_loss": evals[-1] if evals else None, "rows": rep["rows_used"]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
