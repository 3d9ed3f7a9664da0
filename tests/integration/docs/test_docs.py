"""The docs cannot drift: every code block of docs/*.md and README.md that is meant to run is run here, in order per
page, in the doc world (tests/helpers/docworld.py: the files and objects the examples name).

- ``python`` blocks are executed in one namespace per page;
- ``bash`` blocks: each line starting with ``lightning-merge`` runs through the command line (globs expanded) and must
  exit 0; other lines (pip, benchmarks) are not run here;
- ``yaml`` blocks: a recipe (``merge_method`` or ``strategy``) is written to the file its first comment names (or
  ``recipe-N.yaml``) and merged through the command line; a LightningCLI config (``trainer:``) is parsed with
  LightningCLI and its callbacks are built;
- a block whose info string says ``skip`` is left out (none does today; ``text`` blocks are not code).
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
pytestmark = pytest.mark.slow  # the examples train models, run the command line and merge real folders
BLOCK = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)
RUN = ("python", "bash", "yaml")


def blocks(page: Path) -> list[tuple[str, str, str]]:
    return [(lang, info, code) for lang, info, code in BLOCK.findall(page.read_text())
            if lang in RUN and "skip" not in info.split()]


RUNNABLE = [p for p in PAGES if blocks(p)]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from docworld import build

    return build(tmp_path_factory.mktemp("docworld"))


def _cli(args: list[str]) -> None:
    from lightning_merge.cli.commands import main

    expanded: list[str] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if any(c in arg for c in "*?[") else []
        expanded.extend(matches or [arg])
    code = main(expanded)
    assert code == 0, f"lightning-merge {' '.join(expanded)} exited {code}"


def _yaml(code: str, index: int, page: Path) -> None:
    config = yaml.safe_load(code)
    if "trainer" in config:
        from docworld import DocData, DocModel
        from lightning.pytorch.cli import LightningCLI

        path = Path(f"config-{index}.yaml")
        path.write_text(code)
        cli = LightningCLI(DocModel, DocData, run=False, args=["--config", str(path)],
                           save_config_kwargs={"overwrite": True})
        assert cli.trainer.callbacks, f"{page.name}: the config built no callbacks"
        return
    first = code.strip().splitlines()[0]
    named = re.match(r"#\s*([\w.-]+\.ya?ml)", first)
    path = Path(named.group(1) if named else f"recipe-{index}.yaml")
    path.write_text(code)
    if not named:  # a recipe shown on its own: it must merge
        _cli(["merge", str(path), f"out-recipe-{index}", "--no-progress"])


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_the_examples_of_a_page_run(world, tmp_path, monkeypatch, page, request):
    from docworld import namespace, quiet

    quiet()
    work = tmp_path / "world"
    shutil.copytree(world, work, symlinks=True)
    monkeypatch.chdir(work)
    if page.name == "storage.md":  # its examples read and write s3://my-bucket on the suite's S3 server
        _bucket(request.getfixturevalue("s3"), work)
    ns = namespace(work)
    for index, (lang, _info, code) in enumerate(blocks(page)):
        if lang == "python":
            exec(compile(code, f"{page.name} (block {index})", "exec"), ns)  # noqa: S102 - our own docs
        elif lang == "bash":
            for line in code.splitlines():
                args = shlex.split(line, comments=True)
                if args and args[0] == "lightning-merge":
                    _cli(args[1:])
        else:
            _yaml(code, index, page)


def _bucket(s3: str, work: Path) -> None:
    """``s3://my-bucket/experts/{base,code,math}``: the doc world's models, in a bucket of its own."""
    from lightning_merge.files.remote import filesystem

    fs, _ = filesystem(s3)
    if fs.exists("my-bucket"):
        fs.rm("my-bucket", recursive=True)
    fs.mkdir("my-bucket")
    for name in ("base", "code", "math"):
        fs.put(str(work / name), f"my-bucket/experts/{name}", recursive=True)


def test_every_page_with_code_is_run():
    """A page whose code blocks are all skipped or of other languages would escape the test: list them here."""
    code_pages = {p.name for p in PAGES if re.search(r"^```(python|bash|yaml)", p.read_text(), re.M)}
    assert code_pages == {p.name for p in RUNNABLE}
