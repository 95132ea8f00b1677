"""The manual says what the code does: its manifest reference is what the models generate (and every key
has a description), every manifest snippet in it and in the README is a valid manifest section, and
every `byol-runner ...` command line in them parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md", REPO / "CONTRIBUTING.md"]


def test_the_manifest_reference_is_what_the_models_say():
    from runner.reference import reference_markdown

    assert (REPO / "docs" / "manifest.md").read_text() == reference_markdown(), \
        "docs/manifest.md is stale: byol-runner schema --format md > docs/manifest.md"


def test_every_manifest_key_says_what_it_is():
    from runner.reference import undescribed

    assert undescribed() == []


def test_a_key_without_a_description_fails_the_check(monkeypatch):
    from runner.ml.config import ProbeSpec
    from runner.reference import undescribed

    field = ProbeSpec.model_fields["max_iter"]
    monkeypatch.setattr(field, "description", None)
    assert undescribed() == ["probe.max_iter"]


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def _as_manifest(block: dict) -> dict:
    """A snippet as a manifest: the sections it has, over a minimal one (a name and a synthetic data set)."""
    base = {"name": "docs", "datasets": {"synthetic": {"source": "synthetic"}}}
    return base | block


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_manifest_snippet_validates(page, tmp_path, monkeypatch):
    from runner.errors import ManifestError
    from runner.manifest import parse_manifest

    monkeypatch.chdir(tmp_path)
    for block in _yaml_blocks(page.read_text()):
        data = yaml.safe_load(block)
        if not isinstance(data, dict):
            continue
        for name, ds in (data.get("datasets") or {}).items():  # data sets a page names by path: made to exist here
            for key in ("root",):
                if isinstance(ds, dict) and key in ds:
                    (tmp_path / str(ds[key]).replace("${BYOL_DATA:-data}", "data")).mkdir(parents=True, exist_ok=True)
            if isinstance(ds, dict) and "path" in ds:
                target = tmp_path / ds["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"")
            if isinstance(ds, dict) and ds.get("source") == "csv":
                (tmp_path / ds["root"] / ds.get("labels_csv", "labels.csv")).write_text("x\n")
        try:
            parse_manifest(yaml.safe_dump(_as_manifest(data)), f"{page.name} snippet")
        except ManifestError as e:
            pytest.fail(f"{page.relative_to(REPO)}: a manifest snippet does not validate: {e}\n{block}")


def _command_lines(text: str) -> list[str]:
    """`byol-runner ...` as a reader would type it: the command lines of the code blocks (after any
    VAR=value and before a redirection or a comment), and inline code that gives options."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        out += [line.split(" #")[0].strip() for line in block.splitlines()]
    out += [c for c in re.findall(r"`(byol-runner [^`]+)`", text) if " --" in c]
    lines = []
    for line in out:
        m = re.match(r"^(?:[A-Z_]+=\S+\s+)*(byol-runner\s+\S.*)", line)
        if m and "&&" not in m.group(1):
            lines.append(re.split(r"\s[>|]\s", m.group(1))[0].strip())
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_parses(page):
    from runner.cli import build_parser

    parser = build_parser()
    for line in _command_lines(page.read_text()):
        if any(t in line for t in ("...", "[", "|", "MANIFEST", "TASK_ID", "IMAGES", "DIR", "NAME", "FILE")):
            continue  # a synopsis (placeholders, alternatives), not a command to type
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                pytest.fail(f"{page.relative_to(REPO)}: `{line}` does not parse")


def test_the_checks_see_what_a_page_says():
    """A wrong option in a code block, and a wrong key in a snippet, are found (the checks can fail)."""
    from runner.cli import build_parser
    from runner.errors import ManifestError
    from runner.manifest import parse_manifest

    page = "```bash\nBYOL_DATA=x byol-runner run m.yaml --no-such-flag > out.txt   # a comment\n```\n"
    [line] = _command_lines(page)
    assert line == "byol-runner run m.yaml --no-such-flag"
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split(line)[1:])
    [block] = _yaml_blocks("```yaml\npretrain: {epoch: 3}\n```\n")
    with pytest.raises(ManifestError, match="pretrain.epoch: unknown key"):
        parse_manifest(yaml.safe_dump(_as_manifest(yaml.safe_load(block))))


def test_the_monitor_manifest_is_the_cpu_studys_chest_xray_and_valid(tmp_path, monkeypatch):
    """experiments/monitor-cpu.yaml (how long BYOL must pretrain at CPU scale; the speed page and the
    studies page quote it) pretrains on the CPU study's chest X-ray data set, exactly, and validates."""
    import yaml

    from runner.manifest import parse_manifest

    text = (REPO / "experiments" / "monitor-cpu.yaml").read_text()
    monitor, study = yaml.safe_load(text), yaml.safe_load((REPO / "experiments" / "study-cpu.yaml").read_text())
    assert monitor["datasets"] == {"pneumonia": study["datasets"]["pneumonia"]}
    assert monitor["model"] == study["model"] and monitor["run"]["precision"] == study["run"]["precision"]
    (tmp_path / "chest_xray").mkdir()
    monkeypatch.setenv("BYOL_DATA", str(tmp_path))
    manifest = parse_manifest(text, "monitor-cpu.yaml")
    assert manifest.run.monitor_every_steps == 250 and manifest.pretrain.min_steps == 3000
