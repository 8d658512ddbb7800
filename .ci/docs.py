"""Build the documentation site offline into `_docs/`, and README.md, from the notebooks (issue 5).

Where Quarto is installed, `nbdev-docs` is the documented path. Quarto cannot be installed offline, so this script
runs nbdev's own steps up to Quarto and hands `_proc/` to smalldocs, a pure-Python renderer of Quarto projects:

1. `nbs/` is copied to `_exec/` and run as `nbdev-test` runs it (cells flagged slow / gpu / notest are skipped),
   keeping the outputs: tables, plots, the DAG picture;
2. nbdev's docs preprocessing, as `nbdev-docs` does it (`refresh_quarto_yml`, `nbdev_sidebar`, `proc_nbs`: a
   `show_doc` cell for every exported name, hidden cells removed, directives) writes `_proc/`;
3. smalldocs renders `_proc/` (`_quarto.yml`, the sidebar, search) into `_docs/`.

    python .ci/docs.py                   # the site (what `bash .ci/docs` runs)
    python .ci/docs.py readme [--check]  # README.md from nbs/index.ipynb; --check fails when it is stale
"""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)
from fastcore.nbio import read_nb, write_nb
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.processors import FilterDefaults

SHOWN = {"export", "exports", "exporti", "exec_doc"}  # cells nbdev runs itself to build show_doc output
README_HEADER = "<!-- Generated from nbs/index.ipynb by .ci/docs.py: edit the notebook, not this file. -->\n\n"


def execute(dst: Path):
    "Copy nbs/ to `dst` (a sibling of nbs/, so relative paths hold) and run it as nbdev-test does, saving the outputs."
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT/"nbs", dst, ignore=shutil.ignore_patterns(".*", "_proc", "_docs"))
    nbdev_test = shutil.which("nbdev-test", path=str(Path(sys.executable).parent)) or "nbdev-test"
    subprocess.run([nbdev_test, str(dst), "--save", "--do-print"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for p in dst.glob("*.ipynb"):
        # proc_nbs runs import and export cells again to build show_doc output; every other cell already ran here (or
        # was skipped as slow / gpu) and must not run again, from another directory: mark it `eval: false`
        nb = read_nb(p)
        for c in nb.cells:
            if c.cell_type == "code" and not (SHOWN & c.directives.keys()) and not c.source.lstrip().startswith("show_doc"):
                c.source = "#| eval: false\n" + c.source
        write_nb(nb, p)


def output_file(nb) -> str | None:
    "The page name nbdev gives a notebook (`00_config.ipynb` -> `config.html`), from its front matter."
    raw = next((c for c in nb.cells if c.cell_type == "raw"), None)
    m = raw and re.search(r"^output-file:\s*(\S+)", raw.source, re.M)
    return m.group(1) if m else None


def process(src: Path) -> Path:
    "nbdev-docs' steps before Quarto, on the executed notebooks in `src`: returns `_proc/`."
    import nbdev.doclinks
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()  # nbs/_quarto.yml if missing, nbs/nbdev.yml from pyproject.toml (both committed)
    for f in ("_quarto.yml", "nbdev.yml", "styles.css"): shutil.copy(ROOT/"nbs"/f, src/f)
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=src, force=True)
    cache = proc_nbs(str(src), force=True, n_workers=0)
    # Quarto names pages by `output-file` (nbdev strips the number: config.html); smalldocs by the file's name
    sidebar = (cache/"sidebar.yml").read_text()
    for p in sorted(cache.glob("*.ipynb")):
        if (name := output_file(read_nb(p))) and name != p.with_suffix(".html").name:
            p.rename(cache/Path(name).with_suffix(".ipynb"))
            sidebar = sidebar.replace(f"- {p.name}\n", f"- {Path(name).with_suffix('.ipynb')}\n")
    (cache/"sidebar.yml").write_text(sidebar)
    return cache


def render(cache: Path, out: Path):
    "smalldocs renders `_proc/` into `out`; nbdev's absolute links to the published site become relative."
    smalldocs = shutil.which("smalldocs", path=str(Path(sys.executable).parent)) or "smalldocs"
    subprocess.run([smalldocs, "render", str(cache)], check=True)
    built = cache/get_config().doc_path.name  # nbdev.yml's `output-dir`
    cfg = get_config()
    site = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip("/") + "/"
    for page in built.rglob("*.html"):
        html = page.read_text()
        if site in html: page.write_text(html.replace(f'href="{site}', 'href="'))
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(built, out)


def readme(check: bool = False):
    "README.md from nbs/index.ipynb through nbdev's docs processors (no execution): markdown as is, code as code blocks."
    class NoExec(FilterDefaults):
        def base_procs(self): return [p for p in super().base_procs() if p.__name__ != "exec_show_docs"]
    nb = read_nb(ROOT/"nbs"/"index.ipynb")
    NoExec()(nb)
    parts = []
    for c in nb.cells:
        src = c.source.strip()
        if c.cell_type == "raw" and src.startswith("---"):
            import yaml
            fm = yaml.safe_load(src.strip("-\n"))
            parts.append(f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get("description") else ""))
        elif c.cell_type == "markdown" and not src.startswith("<!-- WARNING"): parts.append(src)
        elif c.cell_type == "code":
            opts = dict(re.findall(r"^#\|\s*([\w-]+):\s*(.*)$", src, re.M))
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
            if code and opts.get("echo", "true") != "false" and opts.get("include", "true") != "false":
                parts.append(f"```python\n{code}\n```")
    # links between pages name the site's pages (`params.html`); on the repo's front page they go to the notebooks
    pages = {re.sub(r"^\d+[a-zA-Z0-9]*_", "", p.stem) + ".html": f"nbs/{p.name}" for p in (ROOT/"nbs").glob("*.ipynb")}
    text = re.sub(r"\]\(([\w-]+\.html)(#[^)]*)?\)", lambda m: f"]({pages.get(m[1], m[1])}{m[2] or ''})", "\n\n".join(parts))
    text = README_HEADER + text + "\n"
    if not check: (ROOT/"README.md").write_text(text)
    elif (ROOT/"README.md").read_text() != text: sys.exit("README.md is stale: run `python .ci/docs.py readme` and commit it")


if __name__ == "__main__":
    if sys.argv[1:2] == ["readme"]: readme(check="--check" in sys.argv)
    else:
        execute(ROOT/"_exec")
        render(process(ROOT/"_exec"), get_config().doc_path)
        print(f"site written to {get_config().doc_path.relative_to(ROOT)}/: {len(list(get_config().doc_path.glob('*.html')))} pages")
