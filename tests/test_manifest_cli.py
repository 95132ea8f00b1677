"""Manifests and the headless CLI, as a user meets them: clear one-line errors, exit codes, JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from runner.manifest import parse_manifest
from tests.conftest import REPO, cli_here, copy_results, real_data, run_cli

GOOD = """\
name: t
datasets:
  syn:
    source: synthetic
    per_class: 20
    size: 32
    image_size: 16
labels: {fractions: [0.5, 1.0]}
"""

# (manifest text, what the one-line error must say)
BROKEN = [
    ("name: t\ndatasets: {}\n", r"datasets: List should have at least 1 item|datasets: Dictionary should have at least 1 item"),
    ("name: t\n", r"^error: .*:1?:? ?datasets: required, but missing"),
    ("datasets:\n  s: {source: synthetic}\n", r"name: required, but missing"),
    (GOOD + "bogus: 1\n", r":9: bogus: unknown key"),
    # values that would fail only inside a worker (or train a NaN model to "done") fail here
    (GOOD + "pretrain: {base_lr: .inf}\n", r":9: pretrain\.base_lr: Input should be a finite number"),
    (GOOD + "pretrain: {pred_hidden: -1}\n", r":9: pretrain\.pred_hidden: Input should be greater than or equal to 1"),
    (GOOD + "pretrain: {augment: nonexistent}\n", r":9: pretrain\.augment: unknown augmentation preset: one of auto, byol"),
    (GOOD + "probe: {c_grid: [0.0]}\n", r":9: probe\.c_grid\.0: Input should be greater than 0"),
    (GOOD + "seeds: [true]\n", r":9: seeds\.0: Input should be a valid integer"),
    (GOOD.replace("[0.5, 1.0]", "['0.5', 1.0]"), r":8: labels\.fractions\.0: Input should be a valid number"),
    (GOOD.replace("name: ", "name: runner.db #"), r"name: 'runner\.db' cannot name a run"),
    (GOOD + "pretrain: {epoch: 3}\n", r":9: pretrain\.epoch: unknown key \(did you mean 'epochs'\?\)"),
    (GOOD + "simsiam: {base_rate: 3}\n", r":9: simsiam\.base_rate: unknown key \(did you mean 'base_lr'\?\)"),
    (GOOD + "methods: [byol-finetune, simsiam-fintune]\n", r":9: methods\.1: unknown method \(did you mean 'simsiam-finetune'\?\)"),
    (GOOD.replace("image_size: 16", "imagesize: 16"), r":7: datasets\.syn\.imagesize: unknown key \(did you mean 'image_size'\?\)"),
    (GOOD.replace("per_class: 20", "per_class: many"), r":5: datasets\.syn\.per_class: Input should be a valid integer"),
    (GOOD.replace("[0.5, 1.0]", "[-0.1, 1.0]"), r":8: labels\.fractions\.0: Input should be greater than 0"),
    (GOOD.replace("[0.5, 1.0]", "[0.5, 0.5]"), r"labels\.fractions: a budget is listed twice"),
    (GOOD.replace("[0.5, 1.0]", "[]"), r"labels: no label budget"),
    (GOOD + "seeds: []\n", r"seeds: List should have at least 1 item"),
    (GOOD + "seeds: [1, 1]\n", r"seeds: a seed is listed twice"),
    (GOOD.replace("source: synthetic", "source: dicom"), r"datasets\.syn\.source: unknown value 'dicom': one of imagefolder, csv, npz, synthetic"),
    (GOOD.replace("name: t", "name: ../up"), r"name: '\.\./up' is not a usable name"),
    (GOOD.replace("name: t", "name: tasks"), r"name: 'tasks' cannot name a run"),
    (GOOD.replace("  syn:", "  a/b:"), r":3: datasets\.a/b: 'a/b' is not a usable name: letters, digits"),
    (GOOD.replace("labels:", "  syn:\n    source: synthetic\nlabels:"), r":8: not valid YAML: key 'syn' is written twice"),
    (GOOD.replace("datasets:", "datasets: [\n"), r"not valid YAML"),
    ("- a\n- b\n", r"a manifest is a mapping"),
    ("", r"a manifest is a mapping .* this one is empty"),
    ("name: t\ndatasets:\n  x:\n    source: imagefolder\n    root: /no/such/dir\n", r":5: datasets\.x\.root: no such directory: /no/such/dir"),
    ("name: t\ndatasets:\n  x:\n    source: imagefolder\n    root: ${NO_SUCH_VAR_X}/d\n", r"environment variable NO_SUCH_VAR_X is not set"),
    (GOOD.replace("image_size: 16", "image_size: 16\n    split: {val: 0.6, test: 0.5}"), r"val \+ test must leave something for train"),
    (GOOD.replace("image_size: 16", "image_size: 16\n    split: {group_pattern: '(unclosed'}"), r"not a valid regular expression"),
    (GOOD.replace("image_size: 16", "image_size: 16\n    classes: [class0]"), r"needs at least two classes"),
    (GOOD.replace("image_size: 16", "image_size: 16\n    classes: [class0, class1]\n    positive: x"), r"positive class 'x' is not one of"),
    # hostile files: deep nesting, a list as a key, a flood of keys
    (GOOD + "x: " + "[" * 10_000 + "]" * 10_000 + "\n", r"nest"),
    (GOOD + "? [a, b]\n: 1\n", r":9: not valid YAML: a key here is a list or a mapping: keys are names"),
    (GOOD + "".join(f"k{i}: 1\n" for i in range(30_000)), r"more than 20000 entries: not a manifest"),
]


@pytest.mark.parametrize("text,expected", BROKEN, ids=[f"case{i}" for i in range(len(BROKEN))])
def test_broken_manifest_exits_2_with_a_one_line_reason(write_manifest, text, expected):
    path = write_manifest(text)
    r = run_cli("data", "audit", str(path), "--results", str(path.parent / "r"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), r.stderr
    assert str(path) in lines[0]
    assert re.search(expected, r.stderr, re.M), r.stderr


def test_merge_keys_and_x_keys_let_a_manifest_share_settings():
    m = parse_manifest("x-short: &short {epochs: 3, batch_size: 16}\n" + GOOD + "pretrain: {<<: *short, epochs: 5}\n"
                       "finetune: {<<: *short}\n")
    assert (m.pretrain.epochs, m.pretrain.batch_size, m.finetune.epochs, m.finetune.batch_size) == (5, 16, 3, 16)


def test_only_a_regular_file_of_bounded_size_is_read_as_a_manifest(tmp_path):
    import os

    fifo = tmp_path / "m.yaml"
    os.mkfifo(fifo)  # reading it would wait forever
    huge = tmp_path / "huge.yaml"
    huge.write_text(GOOD + "# " + "x" * (1 << 20) + "\n")
    for path, expected in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (huge, "a manifest is at most")):
        r = run_cli("plan", str(path), "--results", str(tmp_path / "r"), timeout=30)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fuzzed_manifests_are_read_or_refused_with_a_manifest_error():
    """A few hundred manifests made of the schema's keys and hostile values (wrong types, NaN, huge,
    negative, nested, empty): each is read, or refused with a ManifestError (exit 2, one line per
    problem); nothing else escapes (no TypeError, RecursionError, ...)."""
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from runner.errors import ManifestError
    from runner.manifest import _all_field_names

    keys = sorted(_all_field_names())
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=12), st.sampled_from(["synthetic", "byol-finetune", "supervised", "local", "docker",
                                                               "auto", "cpu", "resnet18", "0.5", "1e30", ""]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.sampled_from(keys), inner, max_size=4)),
                          max_leaves=12)
    sections = st.dictionaries(st.sampled_from(keys), values, max_size=6)
    base = {"name": "t", "datasets": {"s": {"source": "synthetic", "per_class": 8, "size": 16, "image_size": 16}}}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sections, st.booleans())
    def check(extra, keep_base):  # noqa: ANN001
        data = {**base, **extra} if keep_base else extra
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except (yaml.YAMLError, ValueError):
            return
        try:
            parse_manifest(text, "fuzz.yaml")
        except ManifestError as e:
            lines = str(e).splitlines()
            assert lines and all(line.startswith("fuzz.yaml") for line in lines), str(e)

    check()


def test_missing_manifest_file_and_usage_errors_exit_2(tmp_path):
    r = run_cli("data", "audit", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such manifest file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("data", "frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_data_problems_exit_2_naming_the_problem(write_manifest, tmp_path):
    csv_dir = tmp_path / "ct"
    csv_dir.mkdir()
    src = real_data("head_ct")
    (csv_dir / "labels.csv").write_text("id, hemorrhage\n000,1\n001,0\n002,1\n")
    (csv_dir / "000.png").write_bytes((src / "000.png").read_bytes())
    (csv_dir / "001.png").write_bytes((src / "001.png").read_bytes())
    cases = {
        "missing image": (f"""\
            name: t
            datasets:
              ct: {{source: csv, root: {csv_dir}, image_column: id, label_column: hemorrhage, image_pattern: '{{}}.png'}}
            """, r"image file missing for line 4: .*002\.png"),
        "missing column": (f"""\
            name: t
            datasets:
              ct: {{source: csv, root: {csv_dir}, image_column: file, label_column: hemorrhage}}
            """, r"no column 'file' \(columns: id, hemorrhage\)"),
        "empty class folder": (f"""\
            name: t
            datasets:
              f: {{source: imagefolder, root: {tmp_path / 'folder'}}}
            """, r"empty class folder"),
        "one class left": (f"""\
            name: t
            datasets:
              ct: {{source: csv, root: {csv_dir}, image_column: id, label_column: hemorrhage, image_pattern: '{{}}.png', on_missing: skip, classes: {{a: ['1'], b: ['7']}}}}
            """, r"classes: '7' not found in the source"),
        "unknown class": (f"""\
            name: t
            datasets:
              s: {{source: imagefolder, root: {src.parent / 'skin_isic' / 'Test'}, classes: [melanoma, naevus]}}
            """, r"'naevus' not found in the source"),
        "fraction too small": (f"""\
            name: t
            datasets:
              s: {{source: imagefolder, root: {src.parent / 'skin_isic' / 'Test'}, classes: [melanoma, nevus], image_size: 16}}
            labels: {{fractions: [0.01]}}
            """, r"datasets\.s: label fraction 0\.01 gives no labeled example of class 'melanoma'"),
    }
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "b").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "x.png").write_bytes((src / "000.png").read_bytes())
    for name, (text, expected) in cases.items():
        path = write_manifest(text, f"{name.replace(' ', '_')}.yaml")
        r = cli_here("data", "audit", str(path), "--results", str(tmp_path / "r"))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, name
        assert re.search(expected, r.stderr), (name, r.stderr)


def test_a_single_class_after_filtering_is_refused(tmp_path):
    from runner.data.dataset import prepare
    from runner.data.sources import ImageFolderSource
    from runner.errors import DataError

    root = tmp_path / "d"
    skin = real_data("skin_isic")
    for cls, src in (("a", "Train/melanoma/ISIC_0000139.jpg"), ("b", "Train/melanoma/ISIC_0000139.jpg")):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.jpg").write_bytes((skin / src).read_bytes())
    (root / "a" / "y.jpg").write_bytes((skin / "Train/nevus/ISIC_0000019.jpg").read_bytes())
    spec = ImageFolderSource(source="imagefolder", root=str(root), image_size=16)
    with pytest.raises(DataError, match=r"only 'a' left after filtering"):
        prepare("d", spec, tmp_path / "c")


def test_demo_manifest_audits_clean_and_headless_never_imports_textual(tmp_path):
    code = (
        "import sys; from runner.cli import main; rc = main(['data', 'audit', 'experiments/demo.yaml', "
        f"'--results', {str(tmp_path)!r}]); "
        "assert 'textual' not in sys.modules, 'the headless path imported textual'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "clean" in r.stdout and "finding (positive)" in r.stdout


def test_audit_json_on_the_real_skin_set_reports_defects_and_exits_1(write_manifest, tmp_path):
    path = write_manifest(f"""\
        name: skin
        datasets:
          melanoma:
            source: imagefolder
            root: {real_data('skin_isic')}
            split_dirs: {{train: Train, test: Test}}
            classes: [melanoma, nevus]
            image_size: 16
            split: {{strategy: given, val: 0.15}}
        labels: {{fractions: [0.01, 1.0], per_class: [2]}}
        seeds: [0, 1]
        """)
    r = run_cli("data", "audit", str(path), "--json", "--results", str(tmp_path / "r"))
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    d = report["datasets"]["melanoma"]
    assert report["clean"] is False
    assert d["n_label_conflicts"] == 155 and d["n_split_leaks"] > 0
    # 155 conflict groups: every Train copy dropped; the 18 copies in the published Test folder stay (reported)
    assert d["dropped_by_reason"] == {"duplicate": 4, "label conflict": 310 - 18}
    assert len(d["kept_in_test"]["label conflict"]) == 18
    assert set(d["counts"]) == {"train", "val", "test"}
    assert sum(d["counts"]["test"].values()) == 32 - 0  # Test/melanoma and Test/nevus: 16 + 16
    assert d["labeled"]["0"]["2/class"] == 4 and d["labeled"]["1"]["100%"] == sum(d["counts"]["train"].values())
    assert any("images under two labels" in x for x in d["defects"])
    # the table form says the same to a person
    r2 = run_cli("data", "audit", str(path), "--results", str(tmp_path / "r"))
    assert r2.returncode == 1 and "155 images under two labels" in r2.stdout.replace("\n", " ")
    assert "read from cache" in r2.stdout.replace("\n", " ")


def test_npz_source_in_medmnist_layout(write_manifest, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    arrays["train_images"][5] = arrays["test_images"][3]  # a leak the audit must find
    np.savez(tmp_path / "mini.npz", **arrays)
    path = write_manifest(f"""\
        name: npz
        datasets:
          mini:
            source: npz
            path: {tmp_path / 'mini.npz'}
            class_names: [benign, malignant]
            image_size: 28
            split: {{strategy: given}}
        labels: {{per_class: [3]}}
        """)
    r = run_cli("data", "audit", str(path), "--json", "--results", str(tmp_path / "r"))
    report = json.loads(r.stdout)["datasets"]["mini"]
    assert r.returncode == 1  # the planted leak
    assert report["n_split_leaks"] == 1 and report["duplicate_groups"][0]["keys"] == ["test/0000003", "train/0000005"]
    # the test copy is kept, the train copy dropped
    assert report["counts"]["test"] == {"benign": 5, "malignant": 5}
    assert sum(report["counts"]["train"].values()) == 39


def test_schema_is_json_and_names_the_sources():
    r = run_cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    text = json.dumps(schema)
    for tag in ("imagefolder", "csv", "npz", "synthetic"):
        assert tag in text
    assert set(schema["required"]) == {"name", "datasets"}


def test_repo_manifests_are_valid(monkeypatch):
    monkeypatch.setenv("BYOL_DATA", str(real_data("head_ct").parent))
    for name in ("demo.yaml", "matrix.yaml"):
        m = parse_manifest((REPO / "experiments" / name).read_text(), name)
        assert m.datasets
    m = parse_manifest((REPO / "experiments" / "matrix.yaml").read_text(), "matrix.yaml")
    assert set(m.datasets) == {"pneumonia", "hemorrhage", "melanoma"}


@pytest.mark.e2e
def test_piped_status_and_plan_show_full_names(tiny_reference):
    """In a CI log (stdout is a pipe) the tables are as wide as their content: no `syn…`, `byo…`."""
    manifest, results, _ = tiny_reference
    for cmd in (("status", "--results", str(results)), ("plan", str(manifest), "--results", str(results))):
        r = run_cli(*cmd)
        assert r.returncode == 0, r.stderr
        assert "…" not in r.stdout and "byol-finetune" in r.stdout and "supervised" in r.stdout, r.stdout
        ids = [p.name for p in (results / "tasks").iterdir()]
        # each task by its short id (what `predict` takes), one per row, none shared
        assert all(sum(line.rstrip().endswith(tid[:8]) for line in r.stdout.splitlines()) == 1 for tid in ids), r.stdout
        assert len({tid[:8] for tid in ids}) == len(ids)
        if cmd[0] == "plan":  # what the data take, and the room on the cache's disk
            line = next(x for x in r.stdout.splitlines() if x.startswith("data: "))
            assert line.startswith(f"data: 80 images, 0.0 MB decoded in {results / 'cache'}; ") and "MB free on its disk" in line, line


@pytest.mark.e2e
def test_run_on_a_terminal_prints_tables_and_piped_the_markdown(tiny_reference, tmp_path):
    """`run` ends with the results table: on a terminal (a real pty, 140x40) drawn as a table, not
    markdown pipes, and where the results went; piped (the reference run's stdout), the markdown
    itself, for a CI log or a file."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    manifest, results, piped = tiny_reference
    assert "| Dataset | Model 1 accuracy | Model 1 loss |" in piped and "|---|" in piped
    finished = copy_results(results, tmp_path / "r")  # every task done: the run only reports
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(finished)], cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm-256color"})
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:  # a hung child fails the test instead of hanging it
        if not select.select([master], [], [], 1.0)[0]:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "Model 1 accuracy" in shown and "syn (25% labels)" in shown, shown
    assert "|---|" not in shown and "| syn (" not in shown, shown
    assert "results: " in shown and "results.md (also .csv, .json, .html" in shown.replace("\r\n", " "), shown


def test_doctor_on_a_local_manifest_does_not_fail_for_docker(write_manifest, tmp_path, monkeypatch):
    """Right after the demo ran on the local executor, `doctor experiments/demo.yaml` must not say FAIL
    for a Docker daemon that manifest never uses."""
    pytest.importorskip("docker")
    path = write_manifest(GOOD)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    r = cli_here("doctor", str(path), "--no-gpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not needed" in r.stdout and "local executor" in r.stdout and "FAIL" not in r.stdout
    plain = cli_here("doctor", "--no-gpu")  # without a manifest: what the default, local executor needs
    assert plain.returncode == 0 and "FAIL" not in plain.stdout and "needed only for --executor docker" in plain.stdout
    image = cli_here("doctor", "--no-gpu", "--image", "byol-runner:latest")  # an image named: Docker is the question
    assert image.returncode == 1 and "FAIL" in image.stdout


def test_every_command_line_argument_says_what_it_is():
    import argparse

    from runner.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str):  # noqa: ANN202
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield name, action

    missing = [f"{name}: {a.dest}" for name, a in walk(build_parser(), "byol-runner") if not a.help]
    assert missing == []


def test_status_at_80_columns_cuts_no_name_and_no_number(tmp_path, monkeypatch):
    """`status` on an 80-column terminal, as kubectl prints a list: every arm's name and loss whole, the
    columns with nothing to say left out (no error column while nothing failed), the short id last,
    a flag as its symbol with the reason below. Compared with the text it must print."""
    import io

    from rich.console import Console

    from runner import console as C

    tasks = [{"id": f"{i}e51c0ffee0000000", "kind": k, "dataset": "synthetic", "method": m, "seed": 0, "budget": b,
              "status": "done", "epoch": 3, "step": 40, "total": 40, "loss": loss, "img_per_s": 50.0, "attempts": 1,
              "error": None, "degenerate": deg}
             for i, (k, m, b, loss, deg) in enumerate([
                 ("pretrain", "byol-pretrain", None, 3.2871, []),
                 ("finetune", "byol-finetune", "10%", 0.3412, []),
                 ("linear", "byol-linear", "10%", 0.3398, ["† miscalibrated: test log-loss at least 0.99 × that of always "
                                                            "predicting the test split's class frequencies"]),
                 ("random-linear", "random-linear", "100%", 0.30121, []),
                 ("supervised", "supervised", "100%", 0.2954, [])])]
    st = {"run": {"id": 3, "name": "demo", "status": "done", "pid": 4242}, "tasks": tasks}
    buf = io.StringIO()
    monkeypatch.setattr(C, "out", Console(file=buf, width=80, force_terminal=False, highlight=False))
    C.print_status(st)
    assert buf.getvalue().splitlines() == [
        "run demo (#3, done, pid 4242)",
        "DATASET    METHOD         LABELS  SEED  STATUS  FLAGS  STEP   LOSS    TRIES  ID",
        "synthetic  byol-pretrain          0     done           40/40  3.2871  1      0e51c0ff",
        "synthetic  byol-finetune  10%     0     done           40/40  0.3412  1      1e51c0ff",
        "synthetic  byol-linear    10%     0     done    †      40/40  0.3398  1      2e51c0ff",
        "synthetic  random-linear  100%    0     done           40/40  0.3012  1      3e51c0ff",
        "synthetic  supervised     100%    0     done           40/40  0.2954  1      4e51c0ff",
        "synthetic byol-linear 10% seed 0 (2e51c0ff): † miscalibrated: test log-loss at least 0.99 × that of always "
        "predicting the test split's class frequencies",
    ]
    # what the run keeps on disk, its network files by name (what a user deletes or keeps)
    st["disk"] = {"bytes": 216_400_000, "networks": {"model.pt": (4, 179_000_000), "encoder.pt": (1, 44_800_000)}}
    buf.truncate(0), buf.seek(0)
    C.print_status(st)
    assert buf.getvalue().splitlines()[-1].startswith(
        "disk: 216.4 MB in the task folders; networks: 1 encoder.pt 44.8 MB, 4 model.pt 179.0 MB (a linear probe's")
    # and the precision they are kept in, with the setting that changes it
    for keep, says in (("fp32", "weights kept in fp32; run.weights: bf16 keeps a third of it; "),
                       ("bf16", "weights kept in bf16, compressed (run.weights); ")):
        buf.truncate(0), buf.seek(0)
        C.print_status(st | {"disk": st["disk"] | {"weights": keep}})
        assert buf.getvalue().splitlines()[-1].startswith(
            f"disk: 216.4 MB in the task folders; networks: 1 encoder.pt 44.8 MB, 4 model.pt 179.0 MB ({says}a linear probe's")


def test_a_results_dir_that_cannot_be_one_is_refused_in_one_line(tmp_path, write_manifest):
    """--results naming a file, /dev/null, a path under a file or a system folder: one line (exit 2)
    from every command that reads or writes it, never a traceback and nothing written there."""
    manifest = write_manifest(GOOD)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for where, says in ((a_file, "not a directory"), ("/dev/null", "not a directory"),
                        (a_file / "sub", "is not a directory, so nothing can be created under it"), ("/proc", "a system folder")):
        for cmd in (("status",), ("report",), ("plan", str(manifest)), ("run", str(manifest)), ("data", "audit", str(manifest))):
            r = cli_here(*cmd, "--results", str(where))
            assert r.returncode == 2 and "Traceback" not in r.stderr, (cmd, where, r.stderr)
            assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr, (cmd, where, r.stderr)
    assert a_file.read_text() == "mine"


def test_the_numbers_that_size_a_run_are_bounded(write_manifest):
    """max_parallel of 2**64 (it ran the machine out of memory) and 10,000 seeds (92 s of planning) are
    refused in one line naming the key and the bound, in the manifest and on the command line."""
    for extra, says in (("executor: {max_parallel: 1025}", "executor.max_parallel: Input should be less than or equal to 1024"),
                        ("executor: {max_parallel: 18446744073709551616}",
                         "executor.max_parallel: 18446744073709551616 is larger than any setting takes (at most 1,000,000,000,000)"),
                        # these passed plan and overflowed SQLite in the run (bench/fuzz_manifests.py found them)
                        ("pretrain: {epochs: 18446744073709551616}", "pretrain.epochs: 18446744073709551616 is larger than any"),
                        ("seeds: [18446744073709551616]", "seeds.0: 18446744073709551616 is larger than any setting takes"),
                        (f"seeds: {list(range(101))}", "seeds: List should have at most 100 items")):
        r = cli_here("plan", str(write_manifest(GOOD + extra + "\n")))
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("run", str(write_manifest(GOOD)), "--max-parallel", "99999999999")
    assert r.returncode == 2 and "--max-parallel: 99999999999: between 1 and 1024" in r.stderr, r.stderr
    # 30 budgets x 4 methods + 1 pretraining, x 100 seeds: 12,100 tasks, refused before any image is decoded
    many = GOOD.replace("labels: {fractions: [0.5, 1.0]}", f"labels: {{fractions: {[round(0.03 * i, 2) for i in range(1, 31)]}}}")
    r = cli_here("plan", str(write_manifest(many + f"seeds: {list(range(100))}\n")))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "12,100 tasks (1 data sets x 100 seeds x 30 label budgets x 4 methods" in r.stderr and "at most 10,000" in r.stderr


def test_a_data_set_of_more_images_than_the_limit_is_refused_before_decoding(write_manifest, monkeypatch, tmp_path):
    """The image limit per data set (runner.data.cache.MAX_IMAGES, 2,000,000; lowered here to 30) ends
    `plan` in one line before a single image is decoded: no cache entry is written."""
    import runner.data.cache as cache

    monkeypatch.setattr(cache, "MAX_IMAGES", 30)
    r = cli_here("plan", str(write_manifest(GOOD)), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "40 images to decode; a data set holds at most 30" in r.stderr and "syn" in r.stderr, r.stderr
    assert not list((tmp_path / "r").rglob("images.npy"))


def test_hostile_data_sets_are_one_line_each_in_plan(tmp_path, write_manifest):
    """What fuzzed manifests found tracebacks with: a folder link looping back up an imagefolder (ELOOP),
    a CSV row naming a file outside the root, image_pattern strings that cannot format one value (or
    would allocate without end), an npz with object arrays, an empty npz. Each ends `plan` in one line
    naming the data set and what is wrong; the loop is listed once and counted as skipped."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    loop = tmp_path / "loop"
    for c in ("a", "b"):
        (loop / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(loop / c / f"{i}.png")
    (loop / "a" / "up").symlink_to("..")
    csvroot = tmp_path / "csvroot"
    csvroot.mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(csvroot / "x.png")
    (csvroot / "labels.csv").write_text("file,label\n/etc/passwd,a\nx.png,b\n")
    np.savez(tmp_path / "obj.npz", train_images=np.array([object()] * 3, dtype=object), train_labels=np.array([0, 1, 0]))
    np.savez(tmp_path / "empty.npz")
    csv = f"{{source: csv, root: {csvroot}, image_column: file, label_column: label"
    cases = [
        (f"{csv}}}", "line 2: /etc/passwd is outside the data set's root"),
        *((f"{csv}, image_pattern: '{p}'}}", "one field, '{}' or a short format") for p in ("{}{}", "{x}", "{0:{1}}", "{:>999999999999}")),
        (f"{{source: npz, path: {tmp_path / 'obj.npz'}}}", "train_images cannot be read as a plain array"),
        (f"{{source: npz, path: {tmp_path / 'empty.npz'}}}", "it holds no arrays"),
    ]
    for spec, says in cases:
        r = cli_here("plan", str(write_manifest(f"name: f\ndatasets:\n  d: {spec}\n")), "--results", str(tmp_path / "r"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (spec, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (spec, r.stderr)
    r = cli_here("plan", str(write_manifest(f"name: f\ndatasets:\n  d: {{source: imagefolder, root: {loop}}}\nlabels: {{fractions: [1.0]}}\nseeds: [0]\n")),
                 "--results", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    audit = cli_here("data", "audit", str(write_manifest(f"name: f\ndatasets:\n  d: {{source: imagefolder, root: {loop}}}\n"
                                                         "labels: {fractions: [1.0]}\nseeds: [0]\n")),
                     "--results", str(tmp_path / "r"))
    assert "folder listed twice" in audit.stdout + audit.stderr, audit.stdout
