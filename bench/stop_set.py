"""The end-of-turn stop rate on a larger held-out set than `sanity_check`'s.

`metrics/eval.json`'s `eos_stop_rate` is measured on the validation split's prompts: 31 in the main job, 20 of them
identity questions and short replay questions. This script takes prompts from the OpenOrca and Open-Platypus files
a project's subsets left out (so no run of that project trained or validated on them), drops those over
`train.max_length` as training does, draws `--n` of each source with a fixed seed, and generates as `sanity_check` does
(greedy, `eval.max_new_tokens` unless `--max-new-tokens`, `eval.repetition_penalty` unless `--repetition-penalty`,
`eval.batch_size`) with the base and with each adapter merged into it.

    python bench/stop_set.py PROJECT [ADAPTER_DIR ...] [--n 75] [--max-new-tokens N] [--repetition-penalty P] [--out FILE]

PROJECT: a reproduced project (its params.yaml, models/base, data/processed/{orca,platypus}.jsonl); the adapters
default to PROJECT/models/adapter. Prints each model's stop rate on every prompt, on those whose reference answer
fits in `eval.max_new_tokens`, and per source; `--out` (JSON) adds every generation that did not stop.
"""
import argparse, json, random, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def held_out_rows(cfg, paths, tok, n: int) -> list[dict]:
    "`n` rows of each source file that `paths`' processed subsets do not hold, at most `train.max_length` tokens."
    from llm_pipeline.config import Paths
    from llm_pipeline.data import ORCA, PLATYPUS, process_source, read_jsonl
    from llm_pipeline.train import fit_length, token_lengths
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        every = Paths(Path(tmp))
        for schema, scfg in ((ORCA, cfg.data.orca), (PLATYPUS, cfg.data.platypus)):
            scfg = scfg.model_copy(update={"source": str(paths.resolve(scfg.source)), "subset_size": None})
            process_source(scfg, schema, f"every_{schema.source}", cfg, every)  # the whole file, validated and converted
            used = {r["id"] for r in read_jsonl(paths.processed(schema.source))}
            cand = [r for r in read_jsonl(every.processed(schema.source)) if r["id"] not in used]
            cand, _ = fit_length(cand, token_lengths(cand, tok), cfg.train.max_length, "drop")
            random.Random(cfg.seed).shuffle(cand)
            rows += cand[:n]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("adapters", nargs="*", type=Path)
    ap.add_argument("--n", type=int, default=75, help="prompts per source")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-new-tokens", type=int, help="the longest generation (default: the project's eval.max_new_tokens)")
    ap.add_argument("--repetition-penalty", type=float, help="on the reply's tokens (default: the project's eval.repetition_penalty)")
    a = ap.parse_args(argv)
    from llm_pipeline.config import Paths, load_params
    from llm_pipeline.evaluate import generate, last_user
    from llm_pipeline.model import load_tokenizer
    from train_side import merged_model
    proj = a.project.resolve()
    cfg, paths = load_params(proj/"params.yaml"), Paths(proj)
    tok = load_tokenizer(cfg, paths)
    rows = held_out_rows(cfg, paths, tok, a.n)
    cap = a.max_new_tokens or cfg.eval.max_new_tokens
    pen = a.repetition_penalty or cfg.eval.repetition_penalty
    ref = [len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
    prompts = [r["messages"][:-1] for r in rows]
    fits = [l <= cap for l in ref]
    out = {"project": str(proj), "max_new_tokens": cap, "repetition_penalty": pen, "n": len(rows), "n_reference_fits": sum(fits), "models": {}}
    per = ", ".join(f"{s} {sum(r['source'] == s for r in rows)}" for s in ("orca", "platypus"))
    print(f"{len(rows)} held-out prompts ({per}), {sum(fits)} with a reference answer of at most {cap} tokens")
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else float("nan")
    for name in ["base"] + [str(p) for p in (a.adapters or [paths.adapter])]:
        model = merged_model(cfg, paths, tok, None if name == "base" else name)
        g = generate(model, tok, prompts, cap, cfg.eval.batch_size, pen)
        st = [x["stopped"] for x in g]
        res = {"stop": rate(st), "stop_reference_fits": rate([s for s, f in zip(st, fits) if f]),
               **{f"stop_{s}": rate([x for x, r in zip(st, rows) if r["source"] == s]) for s in ("orca", "platypus")}}
        print(f"  {name}: {res}", flush=True)
        out["models"][name] = {**res, "no_stop": [{"source": r["source"], "prompt": last_user(p), "reply": x["text"], "reference_tokens": l}
                                                for r, p, x, l, ok in zip(rows, prompts, g, ref, st) if not ok]}
        if a.out: a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
