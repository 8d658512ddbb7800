"""The pipeline's own stages on a GPU: `bench/gpu.py`'s sections `small`, `pipeline` and `levers` (bench/README.md).

- `small`: the whole pipeline (`llm_pipeline.cli.run_pipeline`: data, build_base, train, merge_model, sanity_check)
  on the tiny base, QLoRA (4-bit) in bf16, a few steps: device placement, the 4-bit path, the merge and the evaluation
  on the GPU, with each stage's wall time.
- `pipeline`: our `train` stage (`bench/train_side.py ours`, i.e. `llm-pipeline train`) on a random base of the
  Llama-2-7B shape, against the 2023 recipe (`train_side.py reference`: `reference_train.py`, which on a 4-bit run
  takes the 2023 QLoRA settings, `GPU_2023`), at each sequence length: the same synthetic rows (lengths uniform from
  a quarter of the sequence to all of it), one epoch. Figures: tokens/s after warm-up, peak allocated, MFU, and the
  estimator's prediction for the same configuration (`llm_pipeline.estimate`).
- `levers`: ours with Liger kernels (`train_side.py ours-liger`), and ours padding-free (`train.packing: true`: TRL's
  BFD packing puts rows into one sequence with per-row position ids, and transformers' attention mask keeps them apart).

Each training configuration runs in its own process (its own peak memory; an OOM kills only it and is retried at half
the micro-batch). The random base is written once (bf16 safetensors, with the tiny tokenizer and its chat template),
and `build_base` fingerprints it once: `model.base` is that local folder, as a user's own base would be.
"""
from __future__ import annotations
import json, os, random, shutil, subprocess, sys, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WARM_ROWS = 16  # throughput counts the micro-batches after the first 16 rows (one optimizer step of the preset's batch)


def tiny_tokenizer_dir(work: Path) -> Path:
    "Build the tiny base (`build_base`) in a scratch project and return its folder: the tokenizer the random bases use."
    sys.path.insert(0, str(ROOT))
    from llm_pipeline.cli import scratch_project
    from llm_pipeline.model import build_base
    from llm_pipeline.testing import tiny_params
    paths = scratch_project(ROOT, work/"tiny")
    build_base(tiny_params(ROOT/"params.yaml"), paths)
    return paths.root/"models"/"base"


def random_base(dest: Path, shape: dict, device: str, tok_dir: Path) -> Path:
    "A randomly initialised Llama of `shape`, saved as a local model folder (bf16 safetensors) with the tiny tokenizer."
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tok))}, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device (13.5 GB for the 7B shape), not in fp32
    try:
        with torch.device(device): model = LlamaForCausalLM(cfg)
    finally: torch.set_default_dtype(default)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    del model
    if device != "cpu": torch.cuda.empty_cache()
    return dest


def synthetic_rows(tok, n: int, seq: int, seed: int) -> list[dict]:
    "`n` one-turn conversations of words from the tokenizer's vocabulary, token lengths uniform in [seq/4, seq - 8]."
    rng = random.Random(seed)
    words = sorted({w.strip("Ġ ") for w in tok.get_vocab() if w.strip("Ġ ").isalpha() and len(w.strip("Ġ ")) > 2})
    length = lambda m: len(tok.apply_chat_template(m, tokenize=True, return_dict=False))
    rows = []
    for i in range(n):
        target = rng.randint(seq // 4, seq - 8)
        user = " ".join(rng.choice(words) for _ in range(12))
        answer = [rng.choice(words) for _ in range(target)]
        msgs = lambda k: [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(answer[:k])}]
        lo, hi = 1, len(answer)  # the most words that fit the target (a word is one or more tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if length(msgs(mid)) <= target: lo = mid
            else: hi = mid - 1
        rows.append({"id": f"synthetic-{seq}-{i}", "source": "synthetic", "group": f"synthetic-{i}", "messages": msgs(lo)})
    return rows


def run_project(root: Path, raw: dict, base_dir: Path, train: list[dict], val: list[dict]) -> Path:
    "A run directory: params.yaml, data/final/{train,val}.jsonl and the base's descriptor (copied, fingerprinted once)."
    import yaml
    from llm_pipeline.data import write_jsonl
    root.mkdir(parents=True)
    (root/"params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_jsonl(root/"data"/"final"/"train.jsonl", train)
    write_jsonl(root/"data"/"final"/"val.jsonl", val)
    shutil.copytree(base_dir, root/"models"/"base")
    return root


def steady(stats: dict, batch: int) -> tuple[float, int]:
    """Tokens/s over the micro-batches after the first WARM_ROWS rows, each from its start to the next one's, less the
    evaluations and checkpoint saves between them; and how many micro-batches that is."""
    steps = stats["steps"]
    w = max(1, -(-WARM_ROWS // batch))
    if len(steps) < w + 2: w = 1 if len(steps) >= 3 else 0
    timed = steps[w:]
    if len(timed) < 2: return float("nan"), 0
    t0, t1 = timed[0][0], timed[-1][0]
    pauses = sum(b - a for a, b in stats.get("pauses", []) if a >= t0 and b <= t1)  # evaluations and checkpoint saves
    return sum(n for _, n in timed[:-1]) / (t1 - t0 - pauses), len(timed) - 1


def is_oom(text: str) -> bool:
    return "out of memory" in text.lower() or "OutOfMemoryError" in text


def train_row(side: str, run: Path, timeout: float, env: dict | None = None) -> dict:
    "Run one training side in its own process (`env` added to its environment); its stats, or its failure in one line."
    out = run/"stats.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(BENCH/"train_side.py"), side, str(run), str(out)], cwd=run, env=env,
                           capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:  # it ran, and was stopped: not a configuration that never started
        text = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"status": f"killed at the time budget after {time.perf_counter() - t0:.0f} s",
                "process_s": round(time.perf_counter() - t0, 1), "log_tail": text.strip().splitlines()[-25:]}
    wall = round(time.perf_counter() - t0, 1)
    if r.returncode or not out.exists():
        text = (r.stderr or r.stdout).strip()
        last = text.splitlines()[-1] if text else f"exit {r.returncode}"
        return {"status": "OOM" if is_oom(text) else f"error: {last[:300]}", "process_s": wall,
                "log_tail": text.splitlines()[-25:]}  # what to fix, in the JSON that comes back from the GPU machine
    return {"status": "ok", "process_s": wall, **json.loads(out.read_text())}


def flops_per_token(shape, r: int, targets, seq: int) -> float:
    """Model FLOPs per trained token (bench/gpu.py's convention): 4 N_frozen (forward + input gradients of the frozen
    linears and head) + 6 N_lora + 12 L d s (attention, PaLM's convention); recompute is not counted."""
    from llm_pipeline.estimate import lora_params
    n_frozen = shape.linear_params + shape.vocab * shape.hidden
    return 4 * n_frozen + 6 * lora_params(shape, r, targets) + 12 * shape.layers * shape.hidden * seq


def eager_attention_bytes(shape, batch: int, seq: int) -> float:
    """What the reference's eager attention keeps for the backward beyond what the estimator counts (it models SDPA):
    the softmax in fp32 and its bf16 copy for the product with V (transformers' `eager_attention_forward`), 6 bytes per
    element of batch x heads x seq x seq, in every layer (no gradient checkpointing)."""
    return 6 * batch * shape.heads * seq * seq * shape.layers


def reference_batch(cfg, run: Path, asked: int, gpu_bytes: float) -> int:
    "The largest of asked, asked/2, ... whose estimate (with the eager-attention term) fits 90% of the GPU: no OOM round trips."
    b = asked
    while b > 1 and estimate_row("reference", cfg, run, b)["estimate_allocated_gib"] * 2**30 > 0.9 * gpu_bytes: b //= 2
    return b


def estimate_row(side: str, cfg, run: Path, batch: int) -> dict:
    "The estimator's peak for this configuration: ours from its params (`estimate_for`), the reference's from its settings."
    from llm_pipeline.estimate import estimate_for, estimate_memory, model_shape, lora_params, OPTIM_BYTES, optim_kind
    if side == "reference":
        sys.path.insert(0, str(BENCH))
        from reference_train import GPU_2023
        shape = model_shape(cfg, run)
        est = estimate_memory(shape, "4bit", cfg.lora.r, GPU_2023["target_modules"], cfg.lora.dropout, None, batch,
                              cfg.train.max_length, False, cfg.train.optim, "bf16", double_quant=False)
        est.terms["eager attention (bench only)"] = eager_attention_bytes(shape, batch, cfg.train.max_length)
        targets = GPU_2023["target_modules"]
    else:
        est, shape, targets = estimate_for(cfg, run), model_shape(cfg, run), cfg.lora.target_modules
    paged = lora_params(shape, cfg.lora.r, targets) * OPTIM_BYTES[optim_kind(cfg.train.optim)] if "paged" in cfg.train.optim else 0
    return {"estimate_allocated_gib": est.allocated_gb * 1e9 / 2**30, "estimate_peak_gib": est.peak_gib,
            # a paged optimizer's state lives in CUDA managed memory, which max_memory_allocated does not see
            "estimate_allocated_gib_without_paged_state": (est.allocated_gb * 1e9 - paged) / 2**30,
            "estimate_terms_gib": {k: v / 2**30 for k, v in est.terms.items()}}


def pipeline_rows(shape_name: str, shape: dict, seqs: list[int], device: str, work: Path, deadline: float,
                  peak_tflops: float | None, sides: list[str], levers: bool, on_row=lambda row: None) -> list[dict]:
    "Section `pipeline` (and `levers`): each (side, sequence length) trained by the pipeline's own code in its own process."
    import torch, yaml
    from llm_pipeline.config import PRESETS, Paths, deep_merge, load_params, read_params
    from llm_pipeline.estimate import model_shape
    from llm_pipeline.model import build_base
    from reference_train import GPU_2023
    cuda = device != "cpu"
    if time.monotonic() > deadline - 150:  # the 7B base (15-40 s to write), its fingerprint (a hash of 13.5 GB) and one row
        row = {"section": "pipeline" + (" and levers" if levers else ""), "status": "skipped (time budget)"}
        on_row(row); return [row]
    tok_dir = tiny_tokenizer_dir(work)
    t = time.perf_counter()
    base = random_base(work/f"random-{shape_name}", shape, device, tok_dir)
    build_s = time.perf_counter() - t
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    # the project's params under the llama2-7b-chat preset's keys (the 7B QLoRA recipe), on the random base
    preset = {k: v for k, v in PRESETS["llama2-7b-chat"].items() if k != "model"}
    raw = deep_merge({k: v for k, v in read_params(ROOT/"params.yaml").items() if k != "preset"}, preset)
    raw["model"] = {"base": str(base), "quantization": "4bit"}
    desc_proj = work/"desc"
    (desc_proj/"data").mkdir(parents=True)
    (desc_proj/"params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    t = time.perf_counter()
    build_base(load_params(desc_proj/"params.yaml"), Paths(desc_proj))  # the descriptor, with the folder's fingerprint
    fingerprint_s = time.perf_counter() - t
    print(f"gpu_pipeline: random {shape_name} base in {build_s:.0f} s, fingerprinted in {fingerprint_s:.0f} s", flush=True)
    configs = [(s, seq, {}) for seq in seqs for s in sides]
    if levers:  # Liger's kernels are Triton: CUDA only
        configs += [("ours-liger", seqs[-1], {})] * cuda + [("ours", seqs[-1], {"packing": True})]
    rows, last_s = [], 30.0  # the last configuration's process time: one is not started with less time left than that
    for side, seq, extra in configs:
        name = side + (" + padding-free" if extra.get("packing") else "")
        section = "levers" if (extra or side == "ours-liger") else "pipeline"
        if (left := deadline - time.monotonic()) < last_s:  # before building its rows and project: nothing past the budget
            out = {"section": section, "side": name, "seq": seq,
                   "status": f"skipped (time budget: {left:.0f} s left, the last took {last_s:.0f})"}
            rows.append(out); print(json.dumps(out), flush=True); on_row(out); continue
        n_rows = 48 if cuda else 24
        data = synthetic_rows(tok, n_rows, seq, seed=seq)
        lens = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in data]
        attn_len = sum(n * n for n in lens) / sum(lens)  # a token attends over its own row: the token-weighted mean length
        train = {"max_length": seq, "num_train_epochs": 1.0, "max_steps": -1, "eval_strategy": "no", "save_steps": 100000,
                 "logging_steps": 1, "checkpoint_dir": "checkpoints", **extra}
        if not cuda: train.update(optim="adamw_torch", per_device_train_batch_size=2, global_batch_size=4)
        batch, asked, attempts = None, None, []  # batch None: the recipe's own micro-batch; after an OOM, half of the last
        while True:
            tr = {**raw.get("train", {}), **train}
            if batch is not None and side != "reference": tr["per_device_train_batch_size"] = batch  # global batch kept
            run = work/f"{name.replace(' ', '').replace('+', '-')}-{seq}-{batch or 'asked'}"
            run_project(run, {**raw, "train": tr}, desc_proj/"models"/"base", data, data[:4])
            cfg = load_params(run/"params.yaml")
            if side == "reference" and batch is None:
                asked = 8  # the 2023 recipe's; on a GPU, started at what the estimate says fits (an OOM costs a reload)
                batch = reference_batch(cfg, run, 8, torch.cuda.get_device_properties(0).total_memory) if cuda else 8
                attempts += [{"batch": b, "status": "not run: the estimate does not fit 90% of the GPU"}
                             for b in (8, 4, 2) if b > batch]
            ran_batch = batch if side == "reference" else cfg.train.per_device_train_batch_size
            asked = asked or ran_batch
            remaining = deadline - time.monotonic()
            if remaining < last_s: row = {"status": f"skipped (time budget: {remaining:.0f} s left, the last took {last_s:.0f})"}; break
            res = train_row(side, run, remaining,  # reference_train.py reads its batch from there
                            {"LLM_PIPELINE_BENCH_REFERENCE_BATCH": str(ran_batch)} if side == "reference" else None)
            last_s = max(res.get("process_s", 0), 30.0)
            if res["status"] == "OOM" and ran_batch > 1:  # kept in the row: a real OOM is evidence about the estimate
                attempts.append({"batch": ran_batch, "status": "OOM", "process_s": res.get("process_s"),
                                 "log_tail": res.get("log_tail", [])[-5:]})
                shutil.rmtree(run, ignore_errors=True); batch = ran_batch // 2; continue
            row = {**res, "batch": ran_batch}
            break
        out = {"section": section, "side": name, "seq": seq, "asked_batch": asked, "attempts": attempts,
               **row}  # `steps` kept: each micro-batch's start and tokens, to recheck tokens/s
        if row.get("status") == "ok":
            tps, timed = steady(row, row["batch"])
            if row["batch"] != asked:  # the reference starts at what the estimate says fits; a real OOM halves it again
                out["status"] = f"ok at batch {row['batch']} (" + "; ".join(f"batch {x['batch']}: {x['status']}" for x in attempts) + ")"
            out.update(tokens_per_s=tps, timed_micro_batches=timed)
            targets = cfg.lora.target_modules if side != "reference" else GPU_2023["target_modules"]
            fpt = flops_per_token(model_shape(cfg, run), cfg.lora.r, targets, attn_len)  # the base folder's config.json
            out["model_tflops_per_token"] = fpt / 1e12
            out["mfu"] = fpt * tps / (peak_tflops * 1e12) if peak_tflops else None
            try: out.update(estimate_row(side, cfg, run, row["batch"]))
            except Exception as e: out["estimate"] = f"error: {type(e).__name__}: {e}"
            if out.get("peak_allocated_gib") and "estimate_allocated_gib_without_paged_state" in out:
                out["estimate_over_measured"] = out["estimate_allocated_gib_without_paged_state"] / out["peak_allocated_gib"]
        rows.append(out)
        print(json.dumps({k: v for k, v in out.items() if k not in ("estimate_terms_gib", "steps")}), flush=True)
        on_row(out)
        shutil.rmtree(run, ignore_errors=True)
    return rows


def small_pipeline(device: str, work: Path) -> dict:
    "Section `small`: the whole pipeline on the tiny base, 4-bit, bf16, a few steps, on `device`; each stage's wall time."
    import torch, yaml
    sys.path.insert(0, str(ROOT))
    from llm_pipeline.cli import run_pipeline, scratch_project
    from llm_pipeline.config import load_params
    from llm_pipeline.testing import tiny_raw
    raw = tiny_raw(ROOT/"params.yaml")
    raw["model"]["quantization"] = "4bit"
    raw.setdefault("train", {}).update(precision="bf16" if device != "cpu" else "fp32", max_steps=12, eval_strategy="no",
                                       save_steps=6)
    # on a GPU, the 7B rows' paged AdamW (bitsandbytes' kernel, CUDA managed memory) is tried here first: a failure
    # shows in the first minute, with this section's log, before the 7B rows (which would fail the same way)
    if device != "cpu": raw["train"]["optim"] = "paged_adamw_32bit"
    raw.setdefault("eval", {}).update(max_generic_prompts=6, max_new_tokens=24)
    paths = scratch_project(ROOT, work/"small")
    (paths.root/"params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_params(paths.root/"params.yaml")
    timings, t_all = {}, time.perf_counter()
    from llm_pipeline import cli
    stage = cli.run_stage
    def timed(name, *a, **kw):
        t = time.perf_counter()
        try: return stage(name, *a, **kw)
        finally: timings[name + (f"@{kw['source']}" if kw.get("source") else "")] = round(time.perf_counter() - t, 2)
    cli.run_stage = timed
    try: run_pipeline(cfg, paths)
    finally: cli.run_stage = stage
    metrics = json.loads((paths.root/"metrics"/"eval.json").read_text())
    merged = json.loads((paths.root/"models"/"merged"/"config.json").read_text())
    out = {"section": "small", "status": "ok", "device": device, "stage_s": timings, "wall_s": round(time.perf_counter() - t_all, 1),
           "metrics": metrics, "merged_dtype": merged.get("dtype") or merged.get("torch_dtype")}
    if device != "cpu": out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
