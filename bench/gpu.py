"""The GPU benchmark: the pipeline's own stages on a GPU, ours vs the 2023 recipe (bench/README.md, "gpu").

    python bench/gpu.py                                   # on a GPU, within --time-budget (420 s)
    python bench/gpu.py --device cpu --shape tiny --json OUT.json   # its smoke test: the same code on a CPU (~1 min)

Sections (`--sections`, in this order; each row is written to the JSON as soon as it is measured, so a run cut short
keeps what it has; default JSON on a GPU: bench/results/<date>-<gpu>.json):
- small: the whole pipeline (data, build_base, train, merge_model, sanity_check) on the tiny base, 4-bit, bf16, 12
  steps, on the GPU: device placement, the 4-bit path, the merge and the evaluation, each stage's wall time.
- pipeline: our `train` stage (`llm-pipeline train`) on a random base of the Llama-2-7B shape (hidden 4096, 32 layers,
  32 heads, intermediate 11008, vocab 32000; written once as a local model folder, which `model.base` names) against
  the 2023 recipe (`bench/reference_train.py`), at sequence 1024 and 2048, on the same synthetic rows (token lengths
  uniform from a quarter of the sequence to all of it): tokens/s after warm-up, peak allocated, MFU, and the
  estimator's peak for the same configuration next to the measured one.
- levers: ours with Liger kernels, and ours padding-free (`train.packing: true`), at the longest sequence.

The two recipes:
- ours: `preset: llama2-7b-chat`'s keys: nf4 + double quantization, bf16 compute, LoRA r 64 / alpha 16 / dropout 0.1
  on all linear layers, adapters in bf16 (TRL's QLoRA cast), gradient checkpointing (non-reentrant), SDPA attention,
  micro-batch 4 (global batch 16), paged AdamW 32-bit, loss on assistant tokens.
- reference: the 2023 pipeline's params.yaml / train.py on transformers 4.31-4.33 and TRL 0.7 (`GPU_2023` in
  reference_train.py): nf4 without double quantization, fp16 4-bit compute dtype under bf16 autocast, LoRA r 64 /
  alpha 16 / dropout 0.1 on peft's Llama default (q_proj, v_proj), fp32 adapters, no gradient checkpointing, eager
  attention (SDPA came to Llama in 4.36), batch 8, paged AdamW 32-bit, pad = EOS, loss on every token from the full
  logits, and k-bit preparation (TRL 0.7 did both itself).
Each configuration trains in its own process; one that runs out of memory is retried at half the micro-batch down to
1 (ours keeps its global batch), and the row says which batch ran.

Figures per row:
- tokens/s: non-pad tokens of the micro-batches after the first 16 rows (one optimizer step of ours), over the time
  from the first of them to the last one's start (synchronised), less evaluations and saves: forward, backward,
  optimizer steps.
- peak allocated GiB: `torch.cuda.max_memory_allocated` of the process (weights included). It does not see a paged
  optimizer's state (bitsandbytes keeps it in CUDA managed memory: 8 bytes per trainable parameter), so the estimate
  is compared without that term too (`estimate_allocated_gib_without_paged_state`).
- MFU: model FLOPs/s over the GPU's peak dense bf16 FLOPs (`llm_pipeline.estimate.GPU_SPECS`; unknown GPU: None).
  Model FLOPs per token = 4 N_frozen (forward 2N + input gradients 2N; no weight gradients for the frozen 4-bit base
  and head) + 6 N_lora + 12 L d s (attention, forward and backward, PaLM's convention; s the rows' token-weighted
  mean length). Gradient-checkpointing
  recompute is not model FLOPs, so it lowers MFU: that is the point of the figure.

The GPU machine (FINDINGS.md, "The GPU test machine") has torch, transformers, peft, accelerate, pyarrow, pandas,
PyYAML; it has no network. The rest travels as wheels (GPU_WHEELS below, 52 MB for Python 3.12), fetched here with
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $(python bench/gpu.py --wheels)
and installed there with
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""
from __future__ import annotations
import argparse, json, os, platform, resource, sys, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH/"results"

# What the GPU machine lacks, pinned to the versions the project's lock installs here (a test holds them equal): found by
# running this script's --device cpu smoke run in a venv holding only the GPU machine's packages plus these; 52 MB
# for Python 3.12 (bitsandbytes is 43 of it). liger-kernel (Triton) is only exercised on a GPU. peft is on the machine,
# in a version nobody recorded, and transformers 5.17 needs peft >= 0.19.1: ours travels too (0.8 MB).
GPU_WHEELS = (
    "annotated-types==0.8.0", "atpublic==9.0.0", "bitsandbytes==0.50.2", "configobj==5.0.9", "datasets==5.0.1",
    "dill==0.4.1", "diskcache==5.6.3", "dpath==2.2.0", "dulwich==1.2.21", "dvc-data==3.18.3", "dvc-http==2.32.0",
    "dvc-objects==5.2.0", "dvc-render==1.0.2", "dvc-studio-client==0.23.0", "dvc==3.67.1", "dvclive==3.49.1",
    "flatten-dict==0.5.0", "flufl-lock==9.2.0", "funcy==2.1", "liger-kernel==0.8.5", "multiprocess==0.70.19",
    "orjson==3.13.0", "peft==0.21.2", "platformdirs==4.14.9", "pydantic-core==2.50.5", "pydantic==2.14.4", "pygtrie==2.6.2",
    "ruamel-yaml==0.19.1", "scmrepo==3.6.2", "sqltrie==0.11.3", "trl==1.16.0", "typing-inspection==0.4.5",
    "voluptuous==0.16.0", "zc-lockfile==4.0",
)

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
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


def default_json(device_name: str) -> str:
    "bench/results/<date>-<gpu>.json, e.g. 2026-12-07-nvidia-h200.json."
    slug = "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())
    return str(RESULTS/f"{time.strftime('%Y-%m-%d')}-{slug}.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--sections", default="small,pipeline,levers", help="comma-separated, run in this order: small, pipeline, levers")
    ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 1024,2048; tiny: 64,128)")
    ap.add_argument("--sides", default="ours,reference")
    ap.add_argument("--time-budget", type=float, default=420,
                    help="seconds; a configuration that would start past it is skipped, one still running then is killed "
                         "(420: with the start-up, the wheels' install and the cleanup, the run stays under 8 minutes)")
    ap.add_argument("--json", default=None, help="write the rows here (default on a GPU: bench/results/<date>-<gpu>.json)")
    ap.add_argument("--wheels", action="store_true", help="print the wheels the GPU machine needs (GPU_WHEELS), then exit")
    ap.add_argument("--work", default=None, help="scratch folder for the random base and the runs (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    if a.wheels: print(" ".join(GPU_WHEELS)); return None
    sections = a.sections.split(",")
    if bad := [x for x in sections if x not in ("small", "pipeline", "levers")]:
        ap.error(f"--sections: unknown {', '.join(bad)} (small, pipeline, levers)")
    tiny = a.shape == "tiny"
    try: seqs = [int(s) for s in (a.seqs or ("64,128" if tiny else "1024,2048")).split(",")]
    except ValueError: ap.error(f"--seqs takes comma-separated integers, e.g. 1024,2048 (got {a.seqs!r})")
    if any(s < 2 for s in seqs): ap.error("--seqs: every sequence length must be at least 2")
    import torch
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available(): sys.exit("bench/gpu.py: no CUDA device (use --device cpu --shape tiny for a smoke run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    peak = peak_tflops(name) if device.type == "cuda" else None
    json_path = a.json or (default_json(name) if device.type == "cuda" else None)
    t0 = time.monotonic()
    deadline = t0 + a.time_budget
    print(f"bench/gpu.py: {name}, peak bf16 {peak} TFLOPs, shape {a.shape}, seqs {seqs}, sections {sections}", flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "device": name, "peak_bf16_tflops": peak, "shape": a.shape,
           "torch": torch.__version__, "sections": sections, "rows": [], "complete": False}
    from importlib.metadata import PackageNotFoundError, version
    res["python"], res["cuda"] = platform.python_version(), torch.version.cuda
    for mod in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton", "pydantic",
                "typing_extensions", "pyarrow", "fsspec", "numpy", "safetensors", "huggingface_hub"):  # (liger-kernel has no __version__: read the installed metadata)
        try: res[mod] = version(mod)
        except PackageNotFoundError: res[mod] = None
    def save(row=None):  # after every row, so a run cut short (a killed job, a lost machine) keeps what it measured
        if row is not None: res["rows"].append(row)
        res["wall_s"] = round(time.monotonic() - t0, 1)
        if device.type != "cuda": res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if json_path:  # atomically: a run killed while writing leaves the previous rows, not a truncated file
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path + ".tmp", "w") as f: f.write(json.dumps(res, indent=1) + "\n")
            os.replace(json_path + ".tmp", json_path)
    import tempfile, shutil
    work = Path(a.work or tempfile.mkdtemp(prefix="llm-pipeline-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    res["work"], res["work_free_gb"] = str(work), round(shutil.disk_usage(work).free / 1e9, 1)  # the 7B base takes 13.5 GB
    print(f"bench/gpu.py: scratch {work}, {res['work_free_gb']} GB free", flush=True)
    save()  # the versions and the machine, before the first row
    sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(BENCH))
    import gpu_pipeline as gp
    try:
        for section in sections:
            if section == "levers" and "pipeline" in sections: continue  # the pipeline section ran (or skipped) them
            if time.monotonic() > deadline: save({"section": section, "status": "skipped (time budget)"}); continue
            try:
                if section == "small":
                    save(gp.small_pipeline(a.device, work))
                    print(json.dumps(res["rows"][-1]), flush=True)
                elif section == "pipeline" or (section == "levers" and "pipeline" not in sections):
                    gp.pipeline_rows(a.shape, SHAPES[a.shape], seqs, a.device, work/section, deadline, peak,
                                     a.sides.split(",") if section == "pipeline" else [], levers="levers" in sections,
                                     on_row=save)
            except Exception as e:  # one broken section must not cost the others
                import traceback; traceback.print_exc()
                save({"section": section + (" and levers" if section == "pipeline" and "levers" in sections else ""),
                      "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
    finally:
        if a.work is None: shutil.rmtree(work, ignore_errors=True)
    res["complete"] = True
    save()
    print(f"bench/gpu.py: done in {res['wall_s']} s" + (f", {json_path}" if json_path else ""), flush=True)
    return res


if __name__ == "__main__":
    main()
