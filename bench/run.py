"""Benchmarks against the 2023 reference approach (issue 7). Not part of the test suite.

    python bench/run.py [--reps 3] [--rows 1000000]

Each comparison runs ours and the reference in fresh processes of the same run, alternating, `--reps` times;
the table reports medians (wall seconds, peak RSS of the process) and ratios ours / reference, and is written
to bench/results/<date>-<machine>.json. Sections so far: data at scale. (Training throughput, pipeline
overhead and the GPU script are still to come.)
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, textwrap, time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT/"bench"/".cache"


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


def measure(code: str, *args) -> tuple[float, float]:
    "Wall seconds and peak RSS (MB) of a fresh Python process running `code`."
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status: raise RuntimeError(p.stderr.read().decode()[-3000:])
    return wall, ru.ru_maxrss / 1024


def bench_data(rows: int, reps: int) -> list[dict]:
    src = CACHE/f"orca-{rows}.parquet"
    if not src.exists(): generate_orca(src, rows)
    out = []
    for n in (200, min(100_000, rows // 10)):
        runs = {"ours": [], "reference": []}
        for _ in range(reps):  # alternating, so drift in the machine hits both sides alike
            for side, code in (("ours", OURS), ("reference", REFERENCE)):
                with tempfile.TemporaryDirectory() as d: runs[side].append(measure(code, src, n, d))
        for i, what in ((0, "wall s"), (1, "peak RSS MB")):
            ours, ref = (statistics.median(r[i] for r in runs[s]) for s in ("ours", "reference"))
            out.append({"figure": f"process_orca_data {n} of {rows} rows ({src.stat().st_size / 1e9:.2f} GB): {what}",
                        "ours": round(ours, 2), "reference": round(ref, 2), "ratio": round(ours / ref, 3)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    rows = bench_data(a.rows, a.reps)
    w = max(len(r["figure"]) for r in rows)
    print(f"{'figure':<{w}}  {'ours':>10}  {'reference':>10}  {'ratio':>6}")
    for r in rows: print(f"{r['figure']:<{w}}  {r['ours']:>10}  {r['reference']:>10}  {r['ratio']:>6}")
    res = ROOT/"bench"/"results"/f"{date.today()}-{platform.node() or 'machine'}.json"
    res.write_text(json.dumps({"date": str(date.today()), "machine": platform.platform(), "cpus": os.cpu_count(),
                               "python": sys.version.split()[0], "reps": a.reps, "results": rows}, indent=1) + "\n")
    print(f"written to {res.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
