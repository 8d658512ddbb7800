"""Is the committed dvc.lock stale? Run in a fresh clone *before* `dvc repro`.

Outputs are missing in a fresh clone (there is no DVC remote to pull from), so `deleted` entries are expected, and so is a
`modified` directory dependency that holds other stages' outputs (merge_data's `data/split`: in a fresh clone it holds
only its .gitignore). Any other change (a modified file dependency, a new or changed param) means dvc.lock does not
describe this commit's code and params.
"""
import json, subprocess, sys
import yaml

lock = yaml.safe_load(open("dvc.lock"))["stages"]
outs = {o["path"] for st in lock.values() for o in st.get("outs", [])}
holds_outs = lambda p: any(o.startswith(p.rstrip("/") + "/") for o in outs)  # a directory of other stages' outputs

status = json.loads(subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True,
                                   check=True).stdout or "{}")
stale = []
def walk(stage, d, path=()):
    for k, v in d.items():
        if isinstance(v, dict): walk(stage, v, path + (k,))
        elif v != "deleted" and not (v == "modified" and holds_outs(k)): stale.append(f"{stage}: {' '.join(path + (k,))}: {v}")
for stage, entries in status.items():
    for e in entries:
        if isinstance(e, dict): walk(stage, {k: v for k, v in e.items() if k == "changed deps"})
        else: stale.append(f"{stage}: {e}")
if stale:
    print("dvc.lock is stale (run `dvc repro` and commit dvc.lock):\n  " + "\n  ".join(stale)); sys.exit(1)
print("dvc.lock matches this commit's code and params")
