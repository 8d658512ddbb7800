"""QLoRA throughput on a Llama-2-7B-shaped model: our settings vs the 2023 reference recipe (bench/README.md).

    python bench/gpu.py [--json OUT] [--seqs 1024,2048] [--steps 6]        # on a GPU: < 8 min on an H100
    python bench/gpu.py --device cpu --shape tiny                           # smoke test of the same code path

Nothing is downloaded or read from disk: the model is a randomly initialised Llama with the real 7B shapes (hidden
4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), its decoder linears quantized to 4 bit by bitsandbytes
(a `Params4bit` quantizes itself when moved to the device), then wrapped with peft LoRA and trained on synthetic
full-length token batches (no padding): `--warmup` steps, then `--steps` timed ones.

The two sides (`SIDES`):
- ours: what `params.yaml` with `preset: llama2-7b-chat` runs on a GPU: nf4 + double quantization, bf16 compute,
  LoRA r 64 / alpha 16 / dropout 0.1 on all linear layers, adapters in bf16 (TRL's QLoRA cast), gradient
  checkpointing (non-reentrant), SDPA attention, micro-batch 4, paged AdamW 32-bit.
- reference: the 2023 pipeline's params.yaml / train.py on transformers 4.31-4.33 and TRL 0.7: nf4 without double
  quantization, fp16 4-bit compute dtype under bf16 autocast, LoRA r 64 / alpha 16 / dropout 0.1 on peft's Llama
  default (q_proj, v_proj), fp32 adapters, no gradient checkpointing, eager attention (SDPA came to Llama in 4.36),
  batch 8, paged AdamW 32-bit.
Both go through peft's `prepare_model_for_kbit_training` (norms, embeddings and head upcast to fp32), as TRL does
for a 4-bit model. A configuration that runs out of memory is retried at half the micro-batch until batch 1; the row
says which batch ran and that the asked one was OOM.

Figures per (side, sequence length):
- tokens/s: batch x seq x timed steps / their wall time (forward, backward, optimizer step; synchronised).
- peak GB: `torch.cuda.max_memory_allocated` over warmup and timed steps (weights included).
- MFU: model FLOPs/s over the GPU's peak dense bf16 FLOPs (`llm_pipeline.estimate.GPU_SPECS`; unknown GPU: None). Model FLOPs per
  token = 4 * N_frozen (forward 2N + input-gradient 2N; no weight gradients for the frozen 4-bit base and head)
  + 6 * N_lora (trainable adapters: forward, input and weight gradients) + 12 * L * d * s (attention scores and
  values, forward + backward, PaLM's convention, not halved for causal masking). Gradient-checkpointing recompute
  is not model FLOPs and is not counted, so it lowers MFU: that is the point of the figure.
"""
from __future__ import annotations
import argparse, gc, json, math, os, platform, resource, sys, time

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
}
SIDES = {
    "ours": dict(double_quant=True, compute_dtype="bfloat16", r=64, alpha=16, dropout=0.1, targets="all-linear",
                 adapter_dtype="bfloat16", grad_ckpt=True, attn="sdpa", batch=4),
    "reference": dict(double_quant=False, compute_dtype="float16", r=64, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"],
                      adapter_dtype="float32", grad_ckpt=False, attn="eager", batch=8),
}
def peak_tflops(name: str) -> float | None:
    "Dense bf16 peak of a CUDA device name, from the estimate's one table of GPUs (`llm_pipeline.estimate.GPU_SPECS`)."
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    try: from llm_pipeline.estimate import gpu_spec  # (pydantic and PyYAML: the project's own light dependencies)
    except ImportError as e:
        print(f"bench/gpu.py: no MFU ({e}: install the project's dependencies, or carry pydantic and pyyaml)", file=sys.stderr)
        return None
    spec = gpu_spec(name)
    return spec[0] if spec else None


def build_model(shape: str, side: dict, device):
    "A random Llama of `shape` on `device` whose decoder linears are bnb nf4 `Linear4bit`s, prepared for k-bit training."
    import torch, bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = side["attn"]
    compute = getattr(torch, side["compute_dtype"])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device (13.5 GB for 7B), then quantized layer by layer
    try:
        with torch.device(device): model = LlamaForCausalLM(cfg)
    finally: torch.set_default_dtype(default)
    for parent in list(model.model.layers.modules()):
        for name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear: continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute,
                                  compress_statistics=side["double_quant"], quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=side["double_quant"],
                                         quant_type="nf4", module=q).to(device)  # quantizes here
            if lin.bias is not None: q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del lin
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft reads it
    gc.collect()
    if device.type == "cuda": torch.cuda.empty_cache()
    # as TRL (0.7 and 1.x alike) does for a 4-bit model: freeze, upcast non-quantized params to fp32, checkpointing if asked
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=side["grad_ckpt"],
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not side["grad_ckpt"]: model.gradient_checkpointing_disable()
    return model


def add_lora(model, side: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=side["r"], lora_alpha=side["alpha"], lora_dropout=side["dropout"],
                                             target_modules=side["targets"], bias="none", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad: p.data = p.data.to(getattr(torch, side["adapter_dtype"]))
    return model


def flop_counts(model, shape: str) -> dict:
    "N_frozen (4-bit decoder linears + head, as matmul params), N_lora (trainable), and the attention term's L * d."
    import bitsandbytes as bnb
    n_frozen = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    n_frozen += SHAPES[shape]["vocab_size"] * SHAPES[shape]["hidden_size"]  # lm_head, frozen
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"n_frozen": n_frozen, "n_lora": n_lora, "Ld": SHAPES[shape]["num_hidden_layers"] * SHAPES[shape]["hidden_size"]}


def make_optimizer(model, device):
    "Paged AdamW 32-bit (both recipes); torch AdamW where bitsandbytes cannot page (CPU smoke runs)."
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0), "paged_adamw_32bit"
    return torch.optim.AdamW(params, lr=2e-4), "adamw_torch"


def run_config(model, opt, batch: int, seq: int, warmup: int, steps: int, device, vocab: int, deadline: float) -> dict:
    "Train `warmup` + `steps` steps on random full-length batches; tokens/s of the timed steps and peak memory."
    import torch
    cuda = device.type == "cuda"
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cpu").manual_seed(seq)
    model.train()
    t0, done = None, 0
    for i in range(warmup + steps):
        if i == warmup:
            if cuda: torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        if i >= warmup: done += 1
        if i >= warmup and time.monotonic() > deadline: break  # keep the whole script inside its time budget
    if cuda: torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"batch": batch, "seq": seq, "timed_steps": done, "timed_s": round(dt, 3), "tokens_per_s": batch * seq * done / dt,
           "loss": float(loss.detach())}
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    gc.collect()
    if cuda: torch.cuda.empty_cache()
    return out


def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def bench_side(name: str, shape: str, seqs: list[int], warmup: int, steps: int, device, peak, deadline: float,
               batch: int | None = None, on_row=lambda row: None) -> list[dict]:
    import torch
    side = dict(SIDES[name])
    rows = []
    try:
        t = time.perf_counter()
        model = add_lora(build_model(shape, side, device), side)
        build_s = time.perf_counter() - t
        # one optimizer per side, reused across sequence lengths and OOM retries: bitsandbytes never frees a paged buffer
        # (CUDA managed memory, about 1.3 GB of Adam state here), so an optimizer per configuration would leak one each
        opt, opt_name = make_optimizer(model, device)
    except Exception as e:
        kind = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
        rows = [{"side": name, "seq": s, "status": f"build {kind}"} for s in seqs]
        for r in rows: on_row(r)
        return rows
    counts = flop_counts(model, shape)
    for seq in seqs:
        asked = batch or side["batch"]
        b, row = asked, None
        while b >= 1:
            if time.monotonic() > deadline: row = {"status": "skipped (time budget)"}; break
            oom = False
            try:
                row = {"status": "ok", "optimizer": opt_name,
                       **run_config(model, opt, b, seq, warmup, steps, device, SHAPES[shape]["vocab_size"], deadline)}
                break
            except Exception as e:
                if not is_oom(e): row = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}; break
                oom = True
            if oom:  # outside the except block, so the failed step's frames (and their activations) are gone
                opt.zero_grad(set_to_none=True); model.zero_grad(set_to_none=True); gc.collect()
                if device.type == "cuda": torch.cuda.empty_cache()
                b //= 2
        if row is None: row = {"status": "OOM at batch 1"}
        if row.get("status") == "ok":
            if row["batch"] != asked: row["status"] = f"ok at batch {row['batch']} (batch {asked}: OOM)"
            fpt = 4 * counts["n_frozen"] + 6 * counts["n_lora"] + 12 * counts["Ld"] * seq
            row["model_tflops_per_token"] = fpt / 1e12
            row["mfu"] = fpt * row["tokens_per_s"] / (peak * 1e12) if peak else None
        rows.append({"side": name, "seq": seq, "asked_batch": asked, "build_s": round(build_s, 1), **counts, **row})
        print(json.dumps(rows[-1]), flush=True)
        on_row(rows[-1])
    del model, opt; gc.collect()
    if device.type == "cuda": torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 1024,2048; tiny: 64,128)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per config (default 2; tiny: 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per config (default 6; tiny: 2)")
    ap.add_argument("--sides", default="ours,reference")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch for every side (default: each recipe's own)")
    ap.add_argument("--time-budget", type=float, default=420, help="seconds; configs past it are reported as skipped")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    if (a.steps is not None and a.steps < 1) or (a.warmup is not None and a.warmup < 0):
        ap.error("--steps must be at least 1 (the timed steps) and --warmup at least 0")
    if a.batch is not None and a.batch < 1: ap.error("--batch must be at least 1")
    tiny = a.shape == "tiny"
    try: seqs = [int(s) for s in (a.seqs or ("64,128" if tiny else "1024,2048")).split(",")]
    except ValueError: ap.error(f"--seqs takes comma-separated integers, e.g. 1024,2048 (got {a.seqs!r})")
    if any(s < 2 for s in seqs): ap.error("--seqs: every sequence length must be at least 2")
    import torch
    warmup = a.warmup if a.warmup is not None else (1 if tiny else 2)
    steps = a.steps if a.steps is not None else (2 if tiny else 6)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available(): sys.exit("bench/gpu.py: no CUDA device (use --device cpu --shape tiny for a smoke run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    peak = peak_tflops(name) if device.type == "cuda" else None
    t0 = time.monotonic()
    deadline = t0 + a.time_budget
    print(f"bench/gpu.py: {name}, peak bf16 {peak} TFLOPs, shape {a.shape}, seqs {seqs}", flush=True)
    res = {"device": name, "peak_bf16_tflops": peak, "shape": a.shape, "torch": torch.__version__, "rows": [], "complete": False}
    def save(row=None):  # after every row, so a run cut short (a killed job, a lost machine) keeps what it measured
        if row is not None: res["rows"].append(row)
        res["wall_s"] = round(time.monotonic() - t0, 1)
        if device.type != "cuda": res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if a.json:  # atomically: a run killed while writing leaves the previous rows, not a truncated file
            with open(a.json + ".tmp", "w") as f: f.write(json.dumps(res, indent=1) + "\n")
            os.replace(a.json + ".tmp", a.json)
    for s in a.sides.split(","):
        bench_side(s, a.shape, seqs, warmup, steps, device, peak, deadline, a.batch, on_row=save)
    res["complete"] = True
    save()
    print(f"bench/gpu.py: done in {res['wall_s']} s", flush=True)
    return res


if __name__ == "__main__":
    main()
