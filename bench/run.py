"""Benchmarks against the 2023 reference approach (issue 7). Not part of the test suite; bench/README.md has the details.

    python bench/run.py                 # everything: about 26 min on 2 quiet CPU cores (+ < 8 min on a GPU, if any)
    python bench/run.py --quick         # a smoke run of every section: about 6 min
    python bench/run.py --only train,overhead --train-reps 1

Each comparison runs ours and the reference in fresh processes of the same run, alternating (so drift in the machine
hits both sides alike), and reports medians over the repetitions; ratio = ours / reference. The rows go to one table
and to bench/results/<date>-<machine>[-quick].json (a run with --only replaces just its sections there).

Sections:
- data: `process_orca_data` on a generated OpenOrca-schema parquet of `--rows` rows vs the reference's pandas approach
  (read all, sample, convert): wall seconds and peak RSS of the process.
- json: `process_data` (format sharegpt) taking `--json-subset` conversations from a generated ShareGPT JSON array of
  `--json-mb` MB (default 500) vs reading it whole with `json.load` (what JsonArraySource did before): wall seconds and
  the growth of peak RSS above the process's own after its imports, also as a fraction of the file's size (target < 0.2).
- train: our `train` stage with params.yaml's defaults vs the reference trainer configuration (bench/reference_train.py:
  batch 8, eval every 10 steps, group_by_length, pad = EOS, no packing, loss on prompts), on the embedded tiny model and
  the bundled sample data, same rows and epochs: non-pad tokens per second of `Trainer.train()`, its wall time, the
  whole process's wall time ("stage wall"), peak RSS, and the val loss of each adapter measured the same way afterwards
  (assistant tokens of data/final/val.jsonl). Rep i trains every side with seed + i (`--same-seed`: all with the
  params seed), so the medians are over seeds. `--variants` adds rows for "before" variants and params alternatives.
  `--train-base smollm2-135m`: the same on the embedded real model with its own recipe, plus each adapter's held-out
  identity, leak, stop rate and retention (bench/train_side.py held-out), against the real-model targets.
- levers: the CPU levers on the embedded base, 10 training steps each, each against ours as params.yaml runs it
  (bf16, the compact LM head, group_by_length: the run without each) and four not adopted (dataloader workers,
  torch.compile, LoRA dropout 0, LoRA dropout masks drawn 4 at a time: the run with each): tokens/s after warm-up, Trainer.train() and stage wall, peak RSS.
  `--levers NAME,...` runs only those.
- overhead: a no-op `dvc repro` of a copy of the project (reproduced once, with a 5-step training) vs DVC's own floor
  (as many `echo` stages chained by deps); then, for one key of every params section, the stages `dvc status` marks
  changed and the ones `dvc repro` would rerun (with their downstream), checked against the rule "data params never
  rerun build_base; training params never rerun data stages" (a second table; violations are reported, not raised).
- gpu: bench/gpu.py (the pipeline on a GPU: the tiny base in 4 bit; ours vs the 2023 recipe on a Llama-2-7B shape: tokens/s, peak memory, MFU, the estimate) when
  torch sees a CUDA device; skipped otherwise.

Durations on 2 quiet cores (2026-11-28): data 2.5 min, json 2 min (2 reps; the 500 MB file is generated once into bench/.cache/, 1 min), train 3 x (ours 2.7 + reference 3.8 + val losses 0.7) min, overhead 2 min.
"""
from __future__ import annotations
import argparse, copy, json, os, platform, re, shutil, statistics, subprocess, sys, tempfile, time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llm_pipeline from this checkout
from llm_pipeline.tasks import set_dotted
from llm_pipeline.config import deep_merge, parse_params
from llm_pipeline.testing import dvc, dvc_env, tiny_raw
BENCH = ROOT/"bench"
CACHE = BENCH/".cache"
PY = sys.executable
SECTIONS = ("data", "json", "train", "levers", "overhead", "gpu")


def generate_orca(path: Path, rows: int, seed: int = 0, group: int = 10_000) -> Path:
    "An OpenOrca-schema parquet file with a realistic length distribution (lognormal word counts, a 30k-word vocabulary)."
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    from tqdm.auto import tqdm
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = np.array(["".join(rng.choice(letters, k)) for k in rng.integers(2, 10, 30_000)])
    systems = ["", "", "You are an AI assistant. Provide a detailed answer so user don't need to search outside to understand the answer.",
               "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old."]
    def texts(n, mean_words):
        counts = np.clip(rng.lognormal(np.log(mean_words), 0.8, n).astype(int), 3, 2000)
        words = vocab[rng.integers(0, len(vocab), counts.sum())]
        out, i = [], 0
        for c in counts: out.append(" ".join(words[i:i + c])); i += c
        return out
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.string()) for c in ("id", "system_prompt", "question", "response")])
    with pq.ParquetWriter(path, schema) as w:
        for g in tqdm(range(0, rows, group), desc="generating", unit_scale=group):
            n = min(group, rows - g)
            w.write_table(pa.table({"id": [f"gpt4.{g + i}" for i in range(n)],
                                    "system_prompt": [systems[k] for k in rng.integers(0, len(systems), n)],
                                    "question": texts(n, 60), "response": texts(n, 150)}, schema=schema))
    return path


OURS = """
import sys
from pathlib import Path
from llm_pipeline.config import Paths, parse_params
from llm_pipeline.data import process_orca_data
src, n, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
rep = process_orca_data(parse_params({"seed": 42, "data": {"orca": {"source": src, "subset_size": n}}}), Paths(out))
assert rep["rows_out"] == n, rep
"""

# the reference pipeline's approach: read the whole file with pandas, then sample, then convert
REFERENCE = """
import json, sys
import pandas as pd
src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
df = pd.read_parquet(src)
sub = df.sample(n=n, random_state=42)
with open(out + "/orca.jsonl", "w") as f:
    for r in sub.itertuples(index=False):
        msgs = ([{"role": "system", "content": r.system_prompt}] if r.system_prompt else []) + [
            {"role": "user", "content": r.question}, {"role": "assistant", "content": r.response}]
        f.write(json.dumps({"id": r.id, "messages": msgs}) + "\\n")
"""


def bench_env() -> dict:  # (PYTHONPATH kept after ROOT: on the GPU machine it holds the carried wheels)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true"}


# Linux starts a child's peak RSS (ru_maxrss) at its parent's high-water mark: fork copies it and exec keeps the maximum.
# So the measured process is forked by this small launcher (python -S: about 10 MB), not by run.py, whose own RSS
# (pandas, pyarrow, a generated parquet) would otherwise be the floor of every figure.
# ru_maxrss is one process's peak (the largest of the measured process and its descendants), so while the measured
# process has children (our data stage's workers) the launcher also samples the tree's summed PSS every 20 ms (PSS
# splits the pages a fork shares among the processes sharing them) and reports the larger of the two.
LAUNCH = """import os, sys, time
def tree(p):
    try: kids = [int(c) for t in os.listdir(f"/proc/{p}/task") for c in open(f"/proc/{p}/task/{t}/children").read().split()]
    except OSError: return [p]
    return [p] + [q for c in kids for q in tree(c)]
def pss_kb(p):
    try: return int(next(l for l in open(f"/proc/{p}/smaps_rollup") if l.startswith("Pss:")).split()[1])
    except (OSError, StopIteration): return 0
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try: os.execvp(sys.argv[2], sys.argv[2:])
    finally: os._exit(127)
peak = 0
while not (done := os.wait4(pid, os.WNOHANG))[0]:
    if len(procs := tree(pid)) > 1: peak = max(peak, sum(map(pss_kb, procs)))
    time.sleep(0.02)
_, status, ru = done
open(sys.argv[1], "w").write(repr((time.perf_counter() - t, max(ru.ru_maxrss, peak), os.waitstatus_to_exitcode(status))))
"""


def measure_argv(argv: list, cwd: Path | None = None, env: dict | None = None, stdout: Path | None = None) -> tuple[float, float]:
    "Wall seconds and peak RSS (MB) of a fresh process running `argv` (stderr to a temp file: a full pipe would block it)."
    with tempfile.TemporaryDirectory() as d, open(Path(d)/"err", "w+b") as err, open(stdout or os.devnull, "wb") as out:
        subprocess.run([PY, "-S", "-c", LAUNCH, Path(d)/"res", *map(str, argv)], cwd=cwd, env=env or bench_env(), stdout=out,
                       stderr=err, check=True)
        wall, maxrss, rc = eval((Path(d)/"res").read_text())
        if rc:
            err.seek(0)
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({rc}):\n{err.read().decode(errors='replace')[-4000:]}")
    return wall, maxrss / 1024


def measure(code: str, *args) -> tuple[float, float]:
    "Wall seconds and peak RSS (MB) of a fresh Python process running `code`."
    return measure_argv([PY, "-c", code, *args])


def row(section: str, figure: str, ours, reference, digits: int = 2) -> dict:
    "A table row; ratio = ours / reference where both are numbers."
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    r = lambda v: round(v, digits) if num(v) else v
    ratio = round(ours / reference, 3) if num(ours) and num(reference) and reference else None
    return {"section": section, "figure": figure, "ours": r(ours), "reference": r(reference), "ratio": ratio}


# ---------------------------------------------------------------------------------------------------------------- data
# the before of the worker processes (a request for ParquetSource.FEW rows or more is converted in them)
OURS_ONE_PROCESS = OURS.replace("from llm_pipeline.data import process_orca_data",
                                "from llm_pipeline import data; data.ParquetSource.WORKERS = 1; process_orca_data = data.process_orca_data")
assert OURS_ONE_PROCESS != OURS


# the floor of a random 10% subset, which touches every row group: decoding every row group (every column) in one
# process, each dropped once decoded, with no row converted or written (one read_table of the whole file is slower:
# it materialises 4 GB)
DECODE_FLOOR = """
import sys
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
for i in range(f.num_row_groups): f.read_row_group(i)
"""


def bench_data(rows: int, reps: int) -> list[dict]:
    from llm_pipeline.data import ParquetSource
    src = CACHE/f"orca-{rows}.parquet"
    if not src.exists(): generate_orca(src, rows)
    out = []
    for n in (200, min(100_000, rows // 10)):
        sides = {"ours": OURS, "reference": REFERENCE}
        if n >= ParquetSource.FEW and ParquetSource.WORKERS > 1: sides["ours, in one process"] = OURS_ONE_PROCESS
        if n >= ParquetSource.FEW: sides["decoding every row group, one process: the floor"] = DECODE_FLOOR
        runs = {s: [] for s in sides}
        for _ in range(reps):  # alternating, so drift in the machine hits both sides alike
            for side, code in sides.items():
                with tempfile.TemporaryDirectory() as d: runs[side].append(measure(code, src, n, d))
        for side in (s for s in sides if s != "reference"):
            tag = "" if side == "ours" else f" [{side}]"
            for i, what in ((0, "wall s"), (1, "peak RSS MB")):
                ours, ref = (statistics.median(r[i] for r in runs[s]) for s in (side, "reference"))
                out.append(row("data", f"process_orca_data {n} of {rows} rows ({src.stat().st_size / 1e9:.2f} GB): {what}{tag}", ours, ref))
    return out


# ---------------------------------------------------------------------------------------------------------------- json
def generate_sharegpt(path: Path, mb: int, seed: int = 0) -> Path:
    "A ShareGPT JSON array of about `mb` MB: multi-turn conversations of lognormal lengths, some non-ASCII text."
    import numpy as np
    rng = np.random.default_rng(seed)
    words = np.array(["the", "river", "of", "data", "flows", "into", "a", "model", "that", "learns", "café", "数据", "naïve", "über",
                      "quickly", "when", "every", "row", "is", "counted", "and", "nothing", "lost", "silently"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, size, i = path.with_suffix(".tmp"), 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        while size < mb * 1e6:
            turns = []
            for k in range(2 * int(rng.integers(1, 4))):
                n = int(np.clip(rng.lognormal(np.log(60 if k % 2 else 20), 0.7), 2, 1500))
                turns.append({"from": "gpt" if k % 2 else "human", "value": " ".join(words[rng.integers(0, len(words), n)])})
            s = ("," if i else "") + json.dumps({"id": f"c{i}", "conversations": turns}, ensure_ascii=False) + "\n"
            f.write(s); size += len(s.encode("utf-8")); i += 1
        f.write("]\n")
    os.replace(tmp, path)
    return path

JSON_OURS = """import json, resource, sys
from pathlib import Path
from llm_pipeline.config import Paths, parse_params
from llm_pipeline.formats import process_data
from llm_pipeline.testing import tiny_raw
raw = tiny_raw(); raw["data"]["extra"] = {"big": {"source": sys.argv[1], "format": "sharegpt", "subset_size": int(sys.argv[2])}}
cfg = parse_params(raw)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rep = process_data(cfg, Paths(Path(sys.argv[3])), "big")
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rows_in": rep["rows_in"]}))
"""
JSON_REFERENCE = """import json, random, resource, sys
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = json.load(open(sys.argv[1], encoding="utf-8"))  # the whole array in memory, then a sample
keep = random.Random(42).sample(rows, int(sys.argv[2]))
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rows_in": len(rows)}))
"""


def bench_json(mb: int, subset: int, reps: int) -> list[dict]:
    src = CACHE/f"sharegpt-{mb}mb.json"
    if not src.exists(): generate_sharegpt(src, mb)
    size_mb = src.stat().st_size / 1e6
    runs = {"ours": [], "reference": []}
    for _ in range(reps):  # alternating
        for side, code in (("ours", JSON_OURS), ("reference", JSON_REFERENCE)):
            with tempfile.TemporaryDirectory() as d:
                out = Path(d)/"out.json"
                wall, _ = measure_argv([PY, "-c", code, src, subset, d], stdout=out)
                r = json.loads(out.read_text())
                runs[side].append((wall, (r["peak_kb"] - r["base_kb"]) / 1024, r["rows_in"]))
    med = lambda side, i: statistics.median(r[i] for r in runs[side])
    what = f"{subset} of {runs['ours'][0][2]} ShareGPT conversations ({size_mb:.0f} MB JSON array)"
    return [row("json", f"process_data {what}: wall s", med("ours", 0), med("reference", 0)),
            row("json", f"process_data {what}: peak RSS growth after imports, MB", med("ours", 1), med("reference", 1)),
            row("json", f"process_data {what}: peak RSS growth / file size", med("ours", 1) / size_mb, med("reference", 1) / size_mb, 3)]


# --------------------------------------------------------------------------------------------------------------- train
TRAIN_SIDES = {"ours": ("ours", {}), "reference": ("reference", {})}
# `--variants KEY,...` adds them to the training section: the "before" of an improvement, or a params alternative.
TRAIN_VARIANTS = {"full-head": ("ours, every position to the LM head", "ours-full-head", {}),  # before compact_lm_head
                  "packing": ("ours + packing", "ours", {"train": {"packing": True}}),
                  "fp32": ("ours in fp32", "ours", {"train": {"precision": "fp32"}}),  # before bf16 on a native-bf16 CPU (real base)
                  "dropout0": ("ours, LoRA dropout 0", "ours", {"lora": {"dropout": 0.0}}),  # the lever that shortens Trainer.train() most, with its held-out figures
                  "maskdrop": ("ours, LoRA dropout masks 4 a draw", "ours-maskdrop", {}),  # the same dropout, drawn cheaper: another draw of the recipe
                  "gapdrop": ("ours, LoRA dropout masks by gaps", "ours-gapdrop", {}),  # the same, cheaper still (train_side.gap_dropout)
                  "unlikelihood": ("ours + unlikelihood 1.0", "ours", {"train": {"unlikelihood": 1.0}})}  # against greedy loops (quality: bench/README)
TRAIN_BASES = ("tiny", "smollm2-135m")  # --train-base: the random toy, or the embedded real model (held-out metrics too)


def prepare_train_project(d: Path, base: str = "tiny") -> float:
    "data stages + build_base of the real pipeline (our params.yaml with `model.base: base`, bundled samples) in `d`; returns the seconds it took."
    import yaml
    d.mkdir(parents=True)
    raw = tiny_raw() if base == "tiny" else deep_merge(yaml.safe_load((ROOT/"params.yaml").read_text()), {"model": {"base": base}})
    (d/"params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # the recipe of `base`, as the main job runs it
    shutil.copytree(ROOT/"data"/"samples", d/"data"/"samples")
    code = ("import sys; from pathlib import Path; from llm_pipeline.config import Paths, load_params; "
            "from llm_pipeline.cli import run_pipeline; p = Path(sys.argv[1]); "
            "run_pipeline(load_params(p/'params.yaml'), Paths(p), until='merge-data')")
    return measure(code, d)[0]


def make_run(base: Path, run: Path, overrides: dict) -> Path:
    "A project dir for one training run: `base`'s data and models/base linked, its params.yaml with `overrides`."
    import yaml
    if run.exists(): shutil.rmtree(run)
    (run/"models").mkdir(parents=True)
    (run/"data").symlink_to(base/"data")
    (run/"models"/"base").symlink_to(base/"models"/"base")
    params = deep_merge(yaml.safe_load((base/"params.yaml").read_text()), overrides)
    (run/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return run


PER_PROMPT = ("facts_correct", "misses")  # held_out.json's per-prompt lists: the results JSON keeps the figures only
HELD_OUT = [("identity accuracy", "identity_accuracy", 3, 1), ("name leak rate", "name_leak_rate", 3, -1),
            ("end-of-turn stop rate", "eos_stop_rate", 3, 1), ("retention", "retention", 3, 1)]  # (label, key, digits, better: +1 higher)


def bench_train(reps: int, quick: bool, variants: list[str], tmp: Path, same_seed: bool = False,
                train_base: str = "tiny") -> tuple[list[dict], dict]:
    import yaml
    base = tmp/"base"
    prep_s = prepare_train_project(base, train_base)
    real = train_base != "tiny"
    if real:  # the base's own held-out answers, once: each adapter's retention is measured against them
        measure_argv([PY, BENCH/"train_side.py", "eval-base", base, base/"base_eval.json"])
        base_eval = json.loads((base/"base_eval.json").read_text())
        print(f"  base held-out: {({k: base_eval[k] for k in ('identity_accuracy', 'name_leak_rate', 'eos_stop_rate', 'fact_accuracy')})}", flush=True)
    over = {"train": {"num_train_epochs": 0.5}} if quick else {}  # quick: half an epoch (about the same rows)
    params = deep_merge(yaml.safe_load((base/"params.yaml").read_text()), over)
    epochs = parse_params(params).train.num_train_epochs  # (the base's recipe fills what params.yaml leaves out)
    # rep i trains every side with seed + i (LoRA init and batch order; the data, built once, stay the same), so the
    # val-loss medians are over seeds: one seed's val loss moves by more than the sides differ
    seeds = [params["seed"] + (0 if same_seed else rep) for rep in range(reps)]
    sides = {**TRAIN_SIDES, **{TRAIN_VARIANTS[v][0]: TRAIN_VARIANTS[v][1:] for v in variants}}
    runs = {s: [] for s in sides}
    for rep, seed in enumerate(seeds):
        for name, (kind, ov) in sides.items():  # alternating
            rd = make_run(base, tmp/f"{re.sub(r'[^A-Za-z0-9+]+', '-', name)}-{rep}", {**deep_merge(over, ov), "seed": seed})
            wall, rss = measure_argv([PY, BENCH/"train_side.py", kind, rd, rd/"stats.json"])
            st = {**json.loads((rd/"stats.json").read_text()), "seed": seed, "stage_wall_s": wall, "peak_rss_mb": rss}
            measure_argv([PY, BENCH/"train_side.py", "val-loss", rd, rd/"val.json"])  # afterwards, not timed
            st.update(json.loads((rd/"val.json").read_text()))
            if real:  # identity, leaks, stop, retention: what sanity_check reports, by the same code for every side
                measure_argv([PY, BENCH/"train_side.py", "held-out", rd, rd/"held_out.json", base/"base_eval.json"])
                st.update({k: v for k, v in json.loads((rd/"held_out.json").read_text()).items() if k not in PER_PROMPT})
            st["tokens_per_s"] = st["tokens"] / st["train_s"]
            runs[name].append(st)
            shutil.rmtree(rd/"checkpoints", ignore_errors=True)
            print(f"  train {name} rep {rep + 1}/{reps} (seed {seed}): {st['tokens_per_s']:.0f} tok/s, train() {st['train_s']:.1f} s "
                  f"(eval {st['eval_s']:.1f} s), stage {wall:.1f} s, val loss {st['val_loss']:.4f}"
                  + (f", identity {st['identity_accuracy']}, leak {st['name_leak_rate']}, stop {st['eos_stop_rate']}, "
                     f"retention {st['retention']}" if real else ""), flush=True)
    med = lambda s, k: statistics.median(r[k] for r in runs[s])
    what, section = f"train {train_base}, {epochs:g} ep", "train" if train_base == "tiny" else f"train-{train_base}"
    figures = [("non-pad tokens/s in Trainer.train()", "tokens_per_s", 1), ("Trainer.train() wall s", "train_s", 1),
               ("of which evaluation s", "eval_s", 1), ("stage wall s (whole process)", "stage_wall_s", 1),
               ("peak RSS MB", "peak_rss_mb", 0), ("val loss, assistant tokens", "val_loss", 4),
               ("val loss, assistant tokens but end-of-turn", "val_loss_excl_eos", 4)] + ([h[:3] for h in HELD_OUT] if real else [])
    out = []
    for s in sides:
        if s == "reference": continue
        tag = "" if s == "ours" else f" [{s}]"
        out += [row(section, f"{what}: {label}{tag}", med(s, k), med("reference", k), d) for label, k, d in figures]
    tput = med("ours", "tokens_per_s") / med("reference", "tokens_per_s")
    wall = med("ours", "stage_wall_s") / med("reference", "stage_wall_s")
    # the same seed on both sides: ours - reference per seed (negative: ours better)
    diffs = [round(o["val_loss"] - r["val_loss"], 4) for o, r in zip(runs["ours"], runs["reference"])]
    target = {"throughput_ratio": round(tput, 3), "throughput_2x": tput >= 2,
              "val_loss_equal_or_better": med("ours", "val_loss") <= med("reference", "val_loss"),
              "val_loss_ours_minus_reference_per_seed": dict(zip(map(str, seeds), diffs)),
              "val_loss_ours_better_or_equal_seeds": sum(d <= 0 for d in diffs),
              "same_tokens": {s: [r["tokens"] for r in runs[s]] for s in sides}}
    if real:  # the real-model targets: stage wall <= 0.5x, tokens/s >= 1.5x, every held-out metric (medians) equal or better
        held = {k: (med("ours", k) - med("reference", k)) * better >= 0 for _, k, _, better in HELD_OUT + [("", "val_loss", 4, -1)]}
        target.update(stage_wall_ratio=round(wall, 3), stage_wall_half=wall <= 0.5, throughput_1_5x=tput >= 1.5,
                      held_out_equal_or_better=held)
        print(f"  real-base targets: stage wall {wall:.2f}x ({'met' if wall <= 0.5 else 'NOT met'}, <= 0.5x), tokens/s {tput:.2f}x "
              f"({'met' if tput >= 1.5 else 'NOT met'}, >= 1.5x), held-out equal or better: "
              + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in held.items()), flush=True)
    print(f"  train target (>= 2x reference tokens/s at equal or better val loss): throughput {tput:.2f}x "
          f"({'met' if target['throughput_2x'] else 'NOT met'}), val loss median {med('ours', 'val_loss'):.4f} vs "
          f"{med('reference', 'val_loss'):.4f} ({'met' if target['val_loss_equal_or_better'] else 'NOT met'}; "
          f"ours minus reference per seed: {', '.join(f'{s}: {d:+.4f}' for s, d in zip(seeds, diffs))})", flush=True)
    return out, {"base": train_base, "epochs": epochs, "seeds": seeds, "prepare_s": round(prep_s, 1),
                 **({"base_held_out": {k: v for k, v in base_eval.items() if k not in PER_PROMPT}} if real else {}),
                 "overrides": {s: deep_merge(over, ov) for s, (_, ov) in sides.items()}, "target": target, "runs": runs}


# ------------------------------------------------------------------------------------------------------------ overhead
# one key per params section, and the value it is changed to
SENSITIVITY = [("data.identity", "data.identity.name", "Osprey"), ("data.orca", "data.orca.subset_size", 100),
               ("data.platypus", "data.platypus.subset_size", 100), ("data.split", "data.split.val_size", 0.2),
               ("model", "model.quantization", "4bit"), ("lora", "lora.r", 16), ("train", "train.learning_rate", 0.001),
               ("eval", "eval.max_new_tokens", 64), ("seed", "seed", 7)]
SHORT_RUN = {"train": {"max_steps": 5}, "eval": {"max_generic_prompts": 4, "max_new_tokens": 16}}
DATA_STAGES = ("generate_identity_data", "process_orca_data", "process_platypus_data", "generate_replay_data", "data_split", "merge_data")


def dag(dvc_yaml: Path) -> dict[str, set[str]]:
    "stage -> the stages that directly depend on it (foreach expanded), from dvc.yaml's deps and outs."
    import yaml
    stages = {}
    for name, st in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "foreach" in st:
            for item in st["foreach"]:
                sub = lambda v: v.replace("${item}", str(item))
                stages[f"{name}@{item}"] = {"deps": [sub(d) for d in st["do"].get("deps", [])],
                                            "outs": [sub(o if isinstance(o, str) else next(iter(o))) for o in st["do"].get("outs", [])]}
        else: stages[name] = {"deps": st.get("deps", []), "outs": [o if isinstance(o, str) else next(iter(o)) for o in st.get("outs", [])]}
    producer = {o: s for s, st in stages.items() for o in st["outs"]}
    down = {s: set() for s in stages}
    for s, st in stages.items():
        for d in st["deps"]:
            p = producer.get(d) or next((ps for o, ps in producer.items() if d.startswith(o + "/")), None)
            if p: down[p].add(s)
    return down


def downstream(down: dict[str, set[str]], start) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        s = todo.pop()
        if s not in seen: seen.add(s); todo += down.get(s, ())
    return seen


def make_floor(d: Path, n: int) -> Path:
    "DVC's own floor: a git + DVC repo with `n` `echo` stages, each depending on the previous one's output; reproduced."
    d.mkdir(parents=True)
    lines = ["stages:"]
    for i in range(1, n + 1):
        lines += [f"  s{i}:", f"    cmd: echo {i} > o{i}.txt", *([f"    deps: [o{i - 1}.txt]"] if i > 1 else []), f"    outs: [o{i}.txt]"]
    (d/"dvc.yaml").write_text("\n".join(lines) + "\n")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                [PY, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=d, check=True, env=dvc_env(), capture_output=True)
    dvc(d, "repro")
    return d


def set_key(params: dict, dotted: str, value) -> dict:
    "A copy of `params` with `dotted` set to `value`."
    out = copy.deepcopy(params)
    set_dotted(out, dotted, value)
    return out


def bench_overhead(reps: int, tmp: Path) -> tuple[list[dict], list[dict], dict]:
    import yaml
    from llm_pipeline.testing import project_copy
    proj = tmp/"proj"; proj.mkdir(parents=True)
    project_copy(proj, ROOT)
    # a short training and evaluation: the first repro takes 1.5 min instead of 15; what a no-op repro or a status
    # checks (the same stages, deps, outs of the same sizes, params keys) does not depend on it
    p = yaml.safe_load((proj/"params.yaml").read_text())
    p = deep_merge(p, SHORT_RUN)
    (proj/"params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = dvc_env()
    print("  overhead: first full dvc repro of the project copy ...", flush=True)
    full_s, _ = measure_argv([PY, "-m", "dvc", "repro"], cwd=proj, env=env)
    stages = dvc(proj, "stage", "list", "--name-only").stdout.split()
    floor = make_floor(tmp/"floor", len(stages))
    runs, ran = {"ours": [], "reference": []}, {"ours": [], "reference": []}
    for _ in range(reps):
        for side, d in (("ours", proj), ("reference", floor)):  # alternating
            runs[side].append(measure_argv([PY, "-m", "dvc", "repro"], cwd=d, env=env, stdout=tmp/"repro.out"))
            ran[side] += [l for l in (tmp/"repro.out").read_text().splitlines() if l.startswith("Running stage")]
    n = len(stages)
    rows = [row("overhead", f"first full dvc repro, {n} stages (train.max_steps 5, short eval): wall s", full_s, None, 1)]
    for i, what in ((0, "wall s"), (1, "peak RSS MB")):
        ours, ref = (statistics.median(r[i] for r in runs[s]) for s in ("ours", "reference"))
        rows.append(row("overhead", f"no-op dvc repro, {n} stages vs DVC floor ({n} echo stages): {what}", ours, ref))
    # which stages a change of one key per params section reruns
    down = dag(proj/"dvc.yaml")
    original = (proj/"params.yaml").read_text()
    params = yaml.safe_load(original)
    is_data = lambda s: s.split("@")[0] in DATA_STAGES
    up = {s: {p for p, ds in down.items() if s in ds} for s in down}  # stage -> its direct upstream stages
    # stages training needs that no data stage feeds (build_base): a data param must never rerun them
    build_only = downstream(up, ["train"]) - downstream(down, [s for s in down if is_data(s)]) - {"train"}
    table = []
    try:
        for section, key, value in SENSITIVITY:
            (proj/"params.yaml").write_text(yaml.safe_dump(set_key(params, key, value), sort_keys=False))
            t0 = time.perf_counter()
            status = json.loads(dvc(proj, "status", "--json").stdout or "{}")
            status_s = time.perf_counter() - t0
            direct = sorted(status)
            reruns = sorted(downstream(down, direct))
            if section.startswith("data."):
                rule, bad = "never reruns build_base", [s for s in reruns if s in build_only]
            elif section in ("model", "lora", "train"):
                rule, bad = "never reruns a data stage", [s for s in reruns if is_data(s)]
            elif section == "eval":
                rule, bad = "reruns only the evaluation", [s for s in reruns if is_data(s) or s in ("build_base", "train", "merge_model")]
            else: rule, bad = "(seeds every stage)", []
            table.append({"section": section, "key": f"{key} -> {value!r}", "changed": direct, "reruns": reruns,
                          "rule": rule, "violations": bad, "ok": not bad, "status_s": round(status_s, 2)})
    finally: (proj/"params.yaml").write_text(original)
    return rows, table, {"stages": stages, "reps": reps, "runs": runs, "noop_ran_stages": ran, "first_repro_s": round(full_s, 1)}


# ----------------------------------------------------------------------------------------------------------------- gpu
def bench_gpu(quick: bool, tmp: Path) -> tuple[list[dict], dict]:
    probe = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True, env=bench_env())
    if probe.stdout.strip() != "True":
        print("  GPU section skipped: torch sees no CUDA device (bench/gpu.py --device cpu --shape tiny is its smoke test)", flush=True)
        return [], {"skipped": "no CUDA device"}
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp/"gpu.json"
    argv = [PY, BENCH/"gpu.py", "--json", out] + (["--seqs", "1024", "--sections", "small,pipeline", "--time-budget", "200"] if quick else [])
    try: rc = subprocess.run([str(a) for a in argv], env=bench_env(), timeout=600).returncode
    except subprocess.TimeoutExpired: rc = "a timeout (600 s)"
    if not out.exists(): return [], {"error": f"bench/gpu.py ended with {rc} before its first row"}
    try: res = json.loads(out.read_text())  # written after every row: a run cut short keeps what it measured
    except ValueError as e: return [], {"error": f"bench/gpu.py ended with {rc}; its JSON is unreadable ({e})"}
    if rc: res["error"] = f"bench/gpu.py ended with {rc}; the rows measured before it are kept"
    return gpu_rows(res), res


def gpu_rows(res: dict) -> list[dict]:
    "Table rows from bench/gpu.py's JSON: tokens/s, peak GiB and MFU per sequence length (a status string where not ok)."
    by = {(x["side"], x["seq"]): x for x in res["rows"] if x.get("side") and x.get("seq")}  # (a section's skip row has neither)
    val = lambda x, k: x.get(k) if x.get("status", "").startswith("ok") else x.get("status")
    rows = []
    for (side, seq), o in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0] != "ours")):
        if side == "reference": continue
        f = by.get(("reference", seq), {})
        bs = f"batch {o.get('batch', o.get('asked_batch'))} vs {f.get('batch', f.get('asked_batch'))}"
        name = f"QLoRA {res['shape']}-shape, {side}, seq {seq}, {bs} ({res['device']})"
        rows += [row("gpu", f"{name}: tokens/s", val(o, "tokens_per_s"), val(f, "tokens_per_s"), 0),
                 row("gpu", f"{name}: peak allocated GiB", val(o, "peak_allocated_gib"), val(f, "peak_allocated_gib"), 2),
                 row("gpu", f"{name}: MFU", val(o, "mfu"), val(f, "mfu"), 3),
                 row("gpu", f"{name}: estimate / measured peak", val(o, "estimate_over_measured"), val(f, "estimate_over_measured"), 2)]
    return rows


# -------------------------------------------------------------------------------------------------------------- levers
# CPU levers on the real base, each against ours as params.yaml runs it: (label, the side without the lever, its params)
LEVERS = {"bf16 on a CPU with native bf16": ("ours", {"train": {"precision": "fp32"}}),         # adopted (precision: auto)
          "compact LM head": ("ours-full-head", {}),                                             # adopted (compact_lm_head)
          "group_by_length": ("ours", {"train": {"train_sampling_strategy": "random"}})}        # adopted (random: more padding)
TRIALS = {"dataloader workers 2": ("ours-sft:dataloader_num_workers=2", {}),                     # not in ours: measured with it
          "torch.compile": ("ours-sft:torch_compile=true", {}),
          "LoRA dropout 0": ("ours", {"lora": {"dropout": 0.0}}),  # no Bernoulli mask per adapter input (quality: bench/README)
          "LoRA dropout masks 4 a draw": ("ours-maskdrop", {}),    # train_side.mask_dropout (quality: bench/README)
          "LoRA dropout masks by gaps": ("ours-gapdrop", {})}      # train_side.gap_dropout (quality: bench/README)


def bench_levers(reps: int, steps: int, tmp: Path, names: list[str] | None = None) -> tuple[list[dict], dict]:
    "Ours on the embedded base for `steps` steps against the same run without each lever (or with each trial), alternating."
    levers, trials = ({k: v for k, v in d.items() if names is None or k in names} for d in (LEVERS, TRIALS))
    sys.path.insert(0, str(BENCH))
    import yaml
    from gpu_pipeline import steady
    base = tmp/"base"
    prepare_train_project(base, "smollm2-135m")
    over = {"train": {"max_steps": steps, "eval_strategy": "no", "save_steps": 100000}, "seed": 42}
    sides = {"ours": ("ours", {}), **{f"{k}: without": v for k, v in levers.items()}, **{f"{k}: with": v for k, v in trials.items()}}
    runs = {k: [] for k in sides}
    for rep in range(reps):
        for name, (kind, ov) in sides.items():  # alternating
            rd = make_run(base, tmp/f"lever-{re.sub(r'[^A-Za-z0-9]+', '-', name)}-{rep}", deep_merge(over, ov))
            try:
                wall, rss = measure_argv([PY, BENCH/"train_side.py", kind, rd, rd/"stats.json"])
                st = json.loads((rd/"stats.json").read_text())
                batch = parse_params(yaml.safe_load((rd/"params.yaml").read_text())).train.per_device_train_batch_size
                runs[name].append({"tokens_per_s": steady(st, batch)[0], "train_s": st["train_s"], "stage_wall_s": wall,
                                   "peak_rss_mb": rss, "tokens": st["tokens"], "slots": st["slots"]})
            except RuntimeError as e:
                runs[name].append({"error": str(e).strip().splitlines()[-1][:300]})
            print(f"  {name}: {runs[name][-1]}", flush=True)
    med = lambda name, k: (statistics.median(r[k] for r in runs[name]) if all(k in r for r in runs[name])
                           else runs[name][-1].get("error"))
    rows = []
    for label in (*levers, *trials):
        with_, without = ("ours", f"{label}: without") if label in levers else (f"{label}: with", "ours")
        for k, what, d in (("tokens_per_s", "non-pad tokens/s after warm-up", 1), ("train_s", "Trainer.train() s", 1),
                           ("stage_wall_s", "stage wall s", 1), ("peak_rss_mb", "peak RSS MB", 0)):
            rows.append(row("levers", f"{label} [with / without], {steps} steps: {what}", med(with_, k), med(without, k), d))
    return rows, {"reps": reps, "steps": steps, "runs": runs}


# ---------------------------------------------------------------------------------------------------------------- main
def print_table(rows: list[dict]) -> None:
    s = lambda v: "-" if v is None else str(v)
    w = max(len(r["figure"]) for r in rows)
    print(f"{'figure':<{w}}  {'ours':>10}  {'reference':>10}  {'ratio':>6}")
    for r in rows: print(f"{r['figure']:<{w}}  {s(r['ours']):>10}  {s(r['reference']):>10}  {s(r['ratio']):>6}")


def print_sensitivity(table: list[dict]) -> None:
    print(f"\n{'params section':<14}  {'key changed':<34}  {'rule':<27}  ok   stages dvc repro would rerun (* = changed itself)")
    for t in table:
        stages = ", ".join(f"{s}*" if s in t["changed"] else s for s in t["reruns"]) or "(none)"
        print(f"{t['section']:<14}  {t['key']:<34}  {t['rule']:<27}  {'yes' if t['ok'] else 'NO ':<3}  {stages}")
        if t["violations"]: print(f"{'':<14}  VIOLATION: {', '.join(t['violations'])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, --rows 20000, half a training epoch, 2 no-op repros")
    ap.add_argument("--reps", type=int, default=None, help="data section repetitions (default 3)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the generated parquet (default 1000000)")
    ap.add_argument("--json-mb", type=int, default=None, help="size of the generated ShareGPT JSON array (default 500; --quick: 50)")
    ap.add_argument("--json-subset", type=int, default=1000, help="conversations the json section takes from it (default 1000)")
    ap.add_argument("--train-reps", type=int, default=None, help="training runs per side (default 3)")
    ap.add_argument("--lever-reps", type=int, default=None, help="levers: runs per side (default 1; 10 steps each, about 2 min a run)")
    ap.add_argument("--levers", default="", help="levers: only these, comma-separated (default all: " + ", ".join([*LEVERS, *TRIALS])
                    + "); the others' rows in the day's JSON stay")
    ap.add_argument("--overhead-reps", type=int, default=None, help="no-op dvc repro runs per side (default 5)")
    ap.add_argument("--variants", default="", help="comma-separated training variants to add: " + ", ".join(
        f"{k} ({v[0]})" for k, v in TRAIN_VARIANTS.items()) + "; packing is slow on a CPU (about 4x ours)")
    ap.add_argument("--train-base", default="tiny", choices=TRAIN_BASES, help="the train section's base: tiny (default) or the "
                    "embedded SmolLM2 with its own recipe (adds held-out identity, leak, stop and retention; about 14 min a rep)")
    ap.add_argument("--same-seed", action="store_true", help="every training rep with params.yaml's seed (default: rep i uses seed + i)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (their path is printed)")
    a = ap.parse_args()
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if bad := [v for v in variants if v not in TRAIN_VARIANTS]: ap.error(f"unknown variant(s) {bad}; choose from {list(TRAIN_VARIANTS)}")
    if bad := [s for s in only if s not in SECTIONS]: ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    levers = [v.strip() for v in a.levers.split(",") if v.strip()] or None
    if bad := [v for v in levers or [] if v not in {**LEVERS, **TRIALS}]: ap.error(f"unknown lever(s) {bad}; choose from {[*LEVERS, *TRIALS]}")
    if levers and "levers" not in only: ap.error("--levers needs the levers section in --only")
    q = a.quick
    reps = a.reps or (1 if q else 3)
    n_rows = a.rows or (20_000 if q else 1_000_000)
    train_reps = a.train_reps or (1 if q else 3)
    overhead_reps = a.overhead_reps or (2 if q else 5)
    tmp = Path(tempfile.mkdtemp(prefix="llm-pipeline-bench-"))
    rows, extra, t_all = [], {}, time.perf_counter()
    try:
        for section in only:
            t0 = time.perf_counter()
            print(f"== {section}", flush=True)
            if section == "data": rows += bench_data(n_rows, reps)
            elif section == "json": rows += bench_json(a.json_mb or (50 if q else 500), a.json_subset, reps)
            elif section == "train":
                r, extra["training" if a.train_base == "tiny" else f"training_{a.train_base}"] = bench_train(
                    train_reps, q, variants, tmp/"train", a.same_seed, a.train_base); rows += r
            elif section == "levers":
                r, extra["levers"] = bench_levers(a.lever_reps or 1, 4 if q else 10, tmp/"levers", levers); rows += r
            elif section == "overhead":
                r, extra["params_sensitivity"], extra["overhead"] = bench_overhead(overhead_reps, tmp/"overhead"); rows += r
            elif section == "gpu":
                r, extra["gpu"] = bench_gpu(q, tmp/"gpu"); rows += r
            print(f"   {section}: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if a.keep: print(f"temporary projects kept in {tmp}")
        else: shutil.rmtree(tmp, ignore_errors=True)
    print()
    if rows: print_table(rows)
    if "params_sensitivity" in extra: print_sensitivity(extra["params_sensitivity"])
    res = BENCH/"results"/f"{date.today()}-{platform.node() or 'machine'}{'-quick' if q else ''}.json"
    old = json.loads(res.read_text()) if res.exists() else {}
    replaced = [f"train-{a.train_base}" if s == "train" and a.train_base != "tiny" else s for s in only]
    ran = lambda r: r.get("section", "data") in replaced and (r.get("section") != "levers" or levers is None
                                                              or r["figure"].split(" [")[0] in levers)
    keep = [r for r in old.get("results", []) if not ran(r)]  # a run with --only (--levers) replaces its sections (levers)
    if levers and "levers" in extra:  # the other levers' runs stay beside this run's
        new = {f"ours, beside {', '.join(levers)}" if k == "ours" else k: v for k, v in extra["levers"]["runs"].items()}
        extra["levers"]["runs"] = {**old.get("levers", {}).get("runs", {}), **new}
        extra["levers"]["reps"] = old.get("levers", {}).get("reps", extra["levers"]["reps"])  # the full run's (this one's: settings)
    settings = {"quick": q, "reps": reps, "rows": n_rows, "json_mb": a.json_mb or (50 if q else 500), "json_subset": a.json_subset, "train_reps": train_reps, "lever_reps": a.lever_reps or 1, "overhead_reps": overhead_reps, "variants": variants,
                "same_seed": a.same_seed, "train_base": a.train_base}
    key = lambda s: f"levers: {', '.join(levers)}" if s == "levers" and levers else s  # a subset run's own entry, beside the full run's
    doc = {**{k: v for k, v in old.items() if k not in ("results",)},
           "date": str(date.today()), "machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
           "settings": {**old.get("settings", {}), **{key(s): settings for s in only}},
           "wall_s": {**old.get("wall_s", {}), **{",".join(map(key, only)): round(time.perf_counter() - t_all)}},
           "results": sorted(keep + rows, key=lambda r: SECTIONS.index(r.get("section", "data")) if r.get("section", "data") in SECTIONS
                              else len(SECTIONS)), **extra}
    doc.pop("reps", None)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwritten to {res.relative_to(ROOT)} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
