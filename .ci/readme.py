"""Generate README.md from nbs/index.ipynb offline (Quarto, which `nbdev-readme` needs, cannot be installed offline).

Markdown cells are copied as they are; visible code cells become Python code blocks; cells marked `#| hide` are left out.
`--check` exits 1 when README.md is stale instead of writing it.
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n"

def render(nb_path: Path) -> str:
    parts = []
    for c in json.loads(nb_path.read_text())["cells"]:
        src = "".join(c["source"]).strip()
        if not src or re.search(r"^#\|\s*(hide|exporti?|default_exp)\b", src, re.M): continue
        if c["cell_type"] == "markdown": parts.append(src)
        elif c["cell_type"] == "code":
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|"))
            parts.append(f"```python\n{code}\n```")
    return HEADER + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    text, readme = render(root/"nbs"/"index.ipynb"), root/"README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is stale: run `python .ci/readme.py` and commit it")
    else: readme.write_text(text)
