"""One process of the CPU training benchmark (bench/run.py starts it; bench/README.md explains the figures).

    python bench/train_side.py ours RUN_DIR OUT.json        # our `train` stage (llm-pipeline train --params RUN_DIR/params.yaml)
    python bench/train_side.py ours-full-head RUN_DIR OUT.json   # the same without `compact_lm_head` (the "before" of that change)
    python bench/train_side.py ours-liger RUN_DIR OUT.json  # ours with Liger kernels (a GPU lever: bench/gpu.py)
    python bench/train_side.py ours-maskdrop RUN_DIR OUT.json   # ours with LoRA dropout masks drawn 4 a draw (`mask_dropout`)
    python bench/train_side.py ours-gapdrop RUN_DIR OUT.json    # ours with LoRA dropout masks drawn as gaps (`gap_dropout`)
    python bench/train_side.py ours-sft:KEY=JSON,... RUN_DIR OUT.json   # ours with SFTConfig settings (run.py --only levers)
    python bench/train_side.py reference RUN_DIR OUT.json   # bench/reference_train.py: the 2023 trainer configuration
    python bench/train_side.py val-loss RUN_DIR OUT.json    # the adapter in RUN_DIR/models/adapter, measured on data/final/val.jsonl
    python bench/train_side.py eval-base RUN_DIR OUT.json   # a real base's held-out metrics, as `sanity_check` measures them
    python bench/train_side.py held-out RUN_DIR OUT.json BASE.json   # the adapter's, with retention against BASE.json's

Both training sides run with the same instrumentation of transformers' `Trainer`, written to OUT.json:
- `train_s`: wall time of `Trainer.train()` (model loading and dataset tokenization happen before it; evaluations
  and checkpoint saves during training are inside it, and are also reported on their own: `eval_s`, `save_s`);
- `tokens`: non-pad tokens of every training micro-batch fed to `training_step` (the sum of its attention mask;
  a padding-free batch has no pad), `slots`: tokens including pad, `loss_tokens`: labels that are not -100;
- `steps`: (start time, non-pad tokens) of every micro-batch (on a GPU, synchronised), and `end`, the time training and
  saving ended: bench/gpu.py's throughput after warm-up; on a GPU also `peak_allocated_gib` / `peak_reserved_gib`.
"""
from __future__ import annotations
import functools, json, sys, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def instrument(stats: dict) -> None:
    "Count what `Trainer.training_step` is fed, and time `train`, `evaluate` and checkpoint saves, for every trainer."
    from transformers import Trainer
    from trl import SFTTrainer
    stats.update(tokens=0, slots=0, loss_tokens=0, micro_batches=0, train_s=0.0, eval_s=0.0, save_s=0.0, evals=0, saves=0,
                 steps=[], pauses=[])
    step = Trainer.training_step

    @functools.wraps(step)
    def training_step(self, model, inputs, *a, **kw):
        import torch
        ids, am, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        if ids.is_cuda: torch.cuda.synchronize()  # each micro-batch's start, for the throughput after warm-up (bench/gpu.py)
        n = int(am.sum()) if am is not None else int(ids.numel())
        stats["steps"].append((time.perf_counter(), n))
        stats["tokens"] += n
        stats["slots"] += int(ids.numel())
        if labels is not None: stats["loss_tokens"] += int((labels != -100).sum())
        stats["micro_batches"] += 1
        return step(self, model, inputs, *a, **kw)

    def timed(cls, name, key, count=None):
        fn = getattr(cls, name)
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try: return fn(*a, **kw)
            finally:
                stats[key] += time.perf_counter() - t0
                if count:
                    stats[count] += 1
                    stats["pauses"].append((t0, time.perf_counter()))  # between micro-batches: not training time
        setattr(cls, name, wrapper)

    Trainer.training_step = training_step
    timed(Trainer, "train", "train_s")
    timed(SFTTrainer, "evaluate", "eval_s", "evals")
    timed(Trainer, "_save_checkpoint", "save_s", "saves")


def assistant_losses(model, tok, rows: list[dict], max_length: int, batch_size: int = 16) -> dict:
    "Summed loss and count over the assistant tokens of `rows` (every reply, as `val_loss`), split into end-of-turn (EOS) tokens and the rest."
    import torch
    from llm_pipeline.evaluate import assistant_labels, reply_rows
    eos, rows = tok.eos_token_id, reply_rows(rows)
    acc = {"eos_sum": 0.0, "eos_n": 0, "other_sum": 0.0, "other_n": 0}
    for i in range(0, len(rows), batch_size):
        pairs = [assistant_labels(tok, r["messages"], max_length) for r in rows[i:i + batch_size]]
        L = max(len(x) for x, _ in pairs)
        ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x, _ in pairs])
        lab = torch.tensor([y + [-100] * (L - len(y)) for _, y in pairs])
        with torch.no_grad(): logits = model(input_ids=ids, attention_mask=(lab != -100) | (ids != tok.pad_token_id)).logits.float()
        tgt = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                ignore_index=-100, reduction="none").view_as(tgt)
        is_eos, valid = tgt == eos, tgt != -100
        acc["eos_sum"] += float(nll[valid & is_eos].sum()); acc["eos_n"] += int((valid & is_eos).sum())
        acc["other_sum"] += float(nll[valid & ~is_eos].sum()); acc["other_n"] += int((valid & ~is_eos).sum())
    return acc


def merged_model(cfg, paths, tok, adapter: Path | None):
    "The base as the pipeline loads it (no quantization), with `adapter` merged into it (None: the base alone), in eval mode."
    from peft import PeftModel
    from llm_pipeline.model import load_base_model
    model = load_base_model(cfg, paths, quantization="none", tokenizer=tok)
    return (PeftModel.from_pretrained(model, adapter).merge_and_unload() if adapter else model).eval()


def val_loss_of(run_dir: Path) -> dict:
    """The adapter in RUN_DIR merged into the base, measured as `sanity_check` measures a model: `llm_pipeline.evaluate.val_loss` (token-weighted
    mean cross-entropy over every assistant reply's tokens, end-of-turn included) on the rows of data/final/val.jsonl that
    `sanity_check` scores (a row over `train.max_length` dropped or truncated as `train.overlong` says, as in training), with
    the base's own tokenizer (distinct pad); plus that loss split into end-of-turn tokens and the rest."""
    from llm_pipeline.config import Paths, load_params
    from llm_pipeline.data import read_jsonl
    from llm_pipeline.evaluate import val_loss
    from llm_pipeline.model import load_tokenizer
    from llm_pipeline.train import fit_length, token_lengths
    cfg, paths = load_params(run_dir/"params.yaml"), Paths(run_dir)
    tok = load_tokenizer(cfg, paths)
    # merged, as sanity_check measures models/merged (same losses as the unmerged PeftModel to ~1e-7, and 1.6x faster here)
    model = merged_model(cfg, paths, tok, paths.adapter)
    rows = read_jsonl(paths.final("val"))
    rows, _ = fit_length(rows, token_lengths(rows, tok), cfg.train.max_length, cfg.train.overlong)
    acc = assistant_losses(model, tok, rows, cfg.train.max_length)
    return {"val_loss": val_loss(model, tok, rows, cfg.train.max_length), "val_rows": len(rows),
            "val_loss_eos": acc["eos_sum"] / max(acc["eos_n"], 1), "val_loss_excl_eos": acc["other_sum"] / max(acc["other_n"], 1),
            "eos_tokens": acc["eos_n"], "other_tokens": acc["other_n"]}


def held_out(run_dir: Path, adapter: bool = True, base_eval: Path | None = None) -> dict:
    """Identity, name leaks, stop rate and facts of the base (`adapter=False`) or of RUN_DIR's adapter merged into it,
    by `llm_pipeline.evaluate.evaluate_model` on the rows `sanity_check` uses; with `base_eval`, retention against it."""
    from llm_pipeline.config import Paths, load_params
    from llm_pipeline.data import read_jsonl
    from llm_pipeline.evaluate import evaluate_model, last_user, retention
    from llm_pipeline.model import load_tokenizer
    from llm_pipeline.train import fit_length, token_lengths
    cfg, paths = load_params(run_dir/"params.yaml"), Paths(run_dir)
    tok = load_tokenizer(cfg, paths)
    model = merged_model(cfg, paths, tok, paths.adapter if adapter else None)
    rows = read_jsonl(paths.final("val"))
    rows, _ = fit_length(rows, token_lengths(rows, tok), cfg.train.max_length, cfg.train.overlong)
    facts = read_jsonl(paths.resolve(cfg.eval.retention)) if cfg.eval.retention else []
    metrics, gens = evaluate_model(model, tok, cfg, rows, facts)
    metrics["facts_correct"] = gens["facts_correct"]
    metrics["misses"] = [[kind, last_user(p), g["text"]] for kind, p, g in gens["misses"]]  # (facts lost: compare facts_correct)
    if base_eval is not None: metrics["retention"] = retention(json.loads(base_eval.read_text())["facts_correct"], gens["facts_correct"])
    return metrics


def mask_dropout(x, p: float, training: bool = True):
    """`F.dropout(x, p, training)`, with the mask drawn 4 elements at a time on a CPU: a lever tried, not adopted (bench/README).

    On a CPU that is not Intel's, PyTorch draws a dropout mask one element at a time (`bernoulli_`: one 64-bit
    Mersenne Twister draw each; MKL draws it on Intel CPUs only). Here each element is 16 bits of a 64-bit draw from
    the same generator, kept when they are at least p * 65536 above the minimum (p rounded to 1/65536), so the masks
    are the same kind (independent Bernoulli(1 - p), scaled 1 / (1 - p)) but not the same draws: a run with it is
    another draw of the recipe than the same seed without it."""
    import torch
    if not training or p == 0: return x
    if x.device.type != "cpu" or p == 1: return torch.nn.functional.dropout(x, p, True)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1).view(torch.int16)[:n].view(x.shape)
    return x * torch.where(bits >= round(p * 65536) - 32768, 1 / (1 - p), 0.).to(x.dtype)


def gap_dropout(x, p: float, training: bool = True):
    """`F.dropout(x, p, training)`, with the mask drawn as the gaps between dropped elements on a CPU: a lever tried, not
    adopted (bench/README).

    The gap from one dropped element to the next is geometric, one uniform draw each (floor(log(1 - u) / log(1 - p)) + 1),
    so a mask of n elements takes about p * n draws instead of `bernoulli_`'s n (at p = 0.05, a twentieth). The masks
    are the same kind, every element dropped with probability p on its own and the rest scaled 1 / (1 - p) in x's
    dtype, but not the same draws: a run with it is another draw of the recipe than the same seed without it."""
    import math, torch
    if not training or p == 0: return x
    if x.device.type != "cpu" or p == 1: return torch.nn.functional.dropout(x, p, True)
    n = x.numel()
    k = int(n * p + 8 * math.sqrt(n * p)) + 64  # gaps a draw: enough to pass the end all but about once in 10^15
    pos, end = [], -1
    while end < n - 1:
        gaps = torch.rand(k, dtype=torch.float64).neg_().log1p_().div_(math.log1p(-p)).floor_().long().add_(1)
        pos.append(torch.cumsum(gaps, 0).add_(end)); end = int(pos[-1][-1])
    pos = torch.cat(pos)
    mask = torch.full((n,), 1 / (1 - p), dtype=x.dtype)
    mask[pos[pos < n]] = 0
    return x * mask.view(x.shape)


def _with(args, **kw):
    "A copy of TRL's `SFTConfig` `args` with `kw` set (it is a dataclass)."
    import dataclasses
    return dataclasses.replace(args, **kw)


def main(argv: list[str]) -> None:
    side, run_dir, out = argv[0], Path(argv[1]).resolve(), Path(argv[2])
    if side == "val-loss":
        out.write_text(json.dumps(val_loss_of(run_dir)))
        return
    if side in ("eval-base", "held-out"):
        out.write_text(json.dumps(held_out(run_dir, side == "held-out", Path(argv[3]) if len(argv) > 3 else None)))
        return
    stats: dict = {}
    instrument(stats)
    if side == "ours-liger": side = "ours-sft:use_liger_kernel=true"  # Liger's Triton kernels: a lever on a GPU
    if side in ("ours-maskdrop", "ours-gapdrop"):  # every nn.Dropout of the process: a Llama-architecture base (SmolLM2,
        # tiny) has none of its own (its attention dropout is functional), so these are LoRA's
        import torch
        draw = mask_dropout if side == "ours-maskdrop" else gap_dropout
        torch.nn.Dropout.forward = lambda self, x: draw(x, self.p, self.training)
        side = "ours"
    if side in ("ours", "ours-full-head") or side.startswith("ours-sft:"):
        from llm_pipeline.cli import main as cli
        import llm_pipeline.train
        if side == "ours-full-head":  # before `compact_lm_head`: TRL's own CPU path, every position through the LM head
            llm_pipeline.train.compact_lm_head = lambda: False
        if side.startswith("ours-sft:"):  # a trainer setting our params do not expose (dataloader workers, torch.compile, ...)
            extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in side.split(":", 1)[1].split(","))}
            sft_config = llm_pipeline.train.sft_config
            llm_pipeline.train.sft_config = functools.wraps(sft_config)(lambda *a, **kw: _with(sft_config(*a, **kw), **extra))
        if rc := cli(["train", "--params", str(run_dir/"params.yaml")]): sys.exit(rc)
        rep = json.loads((run_dir/"reports"/"train"/"train.json").read_text())
        stats.update(global_step=rep["global_step"], train_loss=rep["train_loss"], final_eval_loss=rep["final_eval_loss"],
                     rows=rep["lengths"]["rows_used"])
    elif side == "reference":
        sys.path.insert(0, str(BENCH))
        import reference_train
        stats.update(reference_train.main(run_dir))
    else: sys.exit(f"unknown side {side!r}: ours | ours-full-head | ours-liger | ours-maskdrop | ours-gapdrop | ours-sft:KEY=JSON,... | reference | val-loss | eval-base | held-out")
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        stats["end"] = time.perf_counter()
        stats["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else: stats["end"] = time.perf_counter()
    out.write_text(json.dumps(stats))


if __name__ == "__main__":
    main(sys.argv[1:])
