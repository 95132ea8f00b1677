"""Every image accounted for: what a scan skips, what filtering drops, and a published test split that
stays as published. Small image folders and label files made here at run time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.data.dataset import accounting, prepare
from runner.manifest import parse_manifest
from tests.conftest import run_cli


def _png(path: Path, value: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed * 1000 + value)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8) // 2 + value // 2).save(path)


def _csv_study(root: Path) -> Path:
    for i in range(24):
        _png(root / f"{i:03d}.png", 40 + 160 * (i % 2), seed=i)
    rows = ["id,label"] + [f"{i:03d},{i % 2}" for i in range(24)] + ["999,1", "998,0"]  # two rows with no image
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _manifest(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(f"name: acc\ndatasets:\n  d:\n{dataset}\nmethods: [supervised]\nlabels: {{fractions: [1.0]}}\n")
    return path


def test_audit_lists_skipped_rows_and_unknown_files_and_exits_1(tmp_path):
    root = _csv_study(tmp_path / "ct")
    manifest = _manifest(tmp_path, f"""    source: csv
    root: {root}
    image_column: id
    label_column: label
    image_pattern: '{{}}.png'
    on_missing: skip
    image_size: 16
    split: {{strategy: stratified, val: 0.25, test: 0.25}}""")
    r = run_cli("data", "audit", str(manifest), "--json", "--results", str(tmp_path / "r"))
    assert r.returncode == 1, r.stdout + r.stderr
    d = json.loads(r.stdout)["datasets"]["d"]
    assert [s["key"] for s in d["skipped"]] == ["labels.csv:26", "labels.csv:27"]
    assert all(s["reason"] == "missing file" and "999.png" in json.dumps(d["skipped"]) for s in d["skipped"])
    assert d["not_used"] == {"missing file": 2} and d["found"] == 26 and d["used"] == 24
    assert any("2 label rows skipped" in x for x in d["defects"])
    text = run_cli("data", "audit", str(manifest), "--results", str(tmp_path / "r"))
    assert text.returncode == 1 and "label rows skipped" in text.stdout


def test_files_that_are_not_images_are_counted_not_silently_passed_over(tmp_path):
    root = tmp_path / "folders"
    for c in ("a", "b"):
        for i in range(12):
            _png(root / c / f"{i}.png", 40 if c == "a" else 200, seed=i)
    (root / "a" / "scan.dcm").write_bytes(b"DICM")  # read as DICOM (tests/test_medical.py): not one, so unreadable
    (root / "b" / "notes.txt").write_text("x")
    (root / "b" / ".DS_Store").write_bytes(b"")  # hidden: not a data file, not counted
    spec = parse_manifest(f"name: x\ndatasets:\n  d: {{source: imagefolder, root: {root}, image_size: 16}}\n").datasets["d"]
    ds = prepare("d", spec, tmp_path / "cache")
    acc = accounting(ds)
    assert acc["not_used"] == {"unknown extension": 1, "unreadable": 1} and acc["found"] == 26 and acc["used"] == 24
    assert {d.key: d.reason for d in ds.audit.dropped} == {"a/scan.dcm": "unreadable", "b/notes.txt": "unknown extension"}
    assert "not a DICOM file" in ds.table.errors["a/scan.dcm"]
    # named, not only counted: in the run's data.json (results.json), the Data line and the HTML report
    from runner.pages import _not_used_html
    from runner.tables import accounting_line

    assert acc["not_used_files"] == [{"file": "a/scan.dcm", "reason": "unreadable"},
                                     {"file": "b/notes.txt", "reason": "unknown extension"}]
    assert "(e.g. a/scan.dcm (unreadable), b/notes.txt (unknown extension); results.json and the HTML report list them)" \
        in accounting_line("d", acc)
    page = _not_used_html({"data": {"d": acc}})
    assert "d: 2 files not used" in page and "<td>a/scan.dcm</td><td>unreadable</td>" in page


def test_a_given_test_split_stays_as_published(tmp_path):
    """Test holds 10 images: two byte-identical copies of one image, one copy of a train image, one
    copy of a train image under the other label. All 10 stay; train loses its copies."""
    root = tmp_path / "given"
    for c, v in (("neg", 40), ("pos", 200)):
        for i in range(12):
            _png(root / "train" / c / f"tr{i}.png", v, seed=i)
        for i in range(5):
            _png(root / "test" / c / f"te{i}.png", v, seed=100 + i)
    (root / "test" / "neg" / "te_copy.png").write_bytes((root / "test" / "neg" / "te0.png").read_bytes())  # within test
    (root / "test" / "pos" / "te_leak.png").write_bytes((root / "train" / "pos" / "tr3.png").read_bytes())  # train/test leak
    (root / "test" / "neg" / "te_conflict.png").write_bytes((root / "train" / "pos" / "tr4.png").read_bytes())  # two labels
    spec = parse_manifest(f"""name: x
datasets:
  d:
    source: imagefolder
    root: {root}
    split_dirs: {{train: train, test: test}}
    image_size: 16
    split: {{strategy: given, val: 0.25}}
""").datasets["d"]
    ds = prepare("d", spec, tmp_path / "cache")
    assert sum(ds.counts()["test"].values()) == 13  # 10 + the three copies: nothing removed from test
    test_keys = {ds.keys[i] for i in ds.splits["test"]}
    assert {"test/neg/te_copy.png", "test/neg/te0.png", "test/pos/te_leak.png", "test/neg/te_conflict.png"} <= test_keys
    train_keys = {ds.keys[i] for i in np.r_[ds.splits["train"], ds.splits["val"]]}
    assert "train/pos/tr3.png" not in train_keys and "train/pos/tr4.png" not in train_keys
    assert ds.audit.kept_in_test == {"duplicate": ["test/neg/te0.png", "test/neg/te_copy.png"],
                                     "label conflict": ["test/neg/te_conflict.png"]}
    acc = accounting(ds)
    assert acc["not_used"] == {"duplicate": 1, "label conflict": 1}
    assert acc["test_kept"] == {"duplicate": 2, "label conflict": 1}
    assert acc["used"] == acc["found"] - sum(acc["not_used"].values())


def test_a_file_that_is_no_image_is_named_without_a_python_object(tmp_path):
    root = tmp_path / "folders"
    for c in ("a", "b"):
        for i in range(12):
            _png(root / c / f"{i}.png", 40 if c == "a" else 200, seed=i)
    (root / "a" / "fake.png").write_text("not an image at all")
    manifest = _manifest(tmp_path, f"    source: imagefolder\n    root: {root}\n    image_size: 16\n    on_bad_image: fail")
    r = run_cli("data", "audit", str(manifest), "--results", str(tmp_path / "r"))
    assert r.returncode == 2
    assert f"{root / 'a' / 'fake.png'}: not a readable image" in r.stderr
    assert "object at 0x" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("encoding", "delimiter"), [("utf-8", ","), ("utf-8-sig", ";"), ("cp1252", ";"), ("utf-16", "\t"),
                                                     ("latin-1", ",")])
def test_a_label_table_as_people_save_it_is_read(tmp_path, encoding, delimiter):
    """A labels CSV saved by Excel in Western Europe (cp1252, semicolons), with a byte order mark, as
    UTF-16 with tabs: read as written, with accented labels intact, and `data audit` says how it read
    it. A wrong `encoding:` given by hand is one line naming it."""
    import json

    import numpy as np
    from PIL import Image

    from tests.conftest import cli_here

    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", "hémorragie" if i % 2 else "normal"))
    text = "\n".join([delimiter.join(("fichier", "diagnostic"))] + [delimiter.join(r) for r in rows]) + "\n"
    (tmp_path / "labels.csv").write_bytes(text.encode(encoding))
    manifest = tmp_path / "m.yaml"
    body = (f"name: t\ndatasets:\n  d: {{source: csv, root: {tmp_path}, image_column: fichier, label_column: diagnostic, "
            "positive: hémorragie}\nlabels: {fractions: [1.0]}\nseeds: [0]\n")
    manifest.write_text(body, encoding="utf-8")
    r = cli_here("data", "audit", str(manifest), "--results", str(tmp_path / "r"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["datasets"]["d"]
    assert sorted(d["classes"]) == ["hémorragie", "normal"] and d["used"] == 40
    names = {"utf-8": "utf-8", "utf-8-sig": "utf-8 (with a byte order mark)", "cp1252": "utf-8", "utf-16": "utf-16", "latin-1": "utf-8"}
    if encoding in ("cp1252", "latin-1"):  # é is 0xe9 in both: not UTF-8, so cp1252 is what is detected
        assert d["table"]["encoding"] == "cp1252"
    else:
        assert d["table"]["encoding"] == names[encoding]
    assert d["table"]["delimiter"] == {",": "comma", ";": "semicolon", "\t": "tab"}[delimiter]
    assert d["table"]["detected"] == ["encoding", "delimiter"]
    if encoding == "cp1252":
        manifest.write_text(body.replace("positive:", "encoding: utf-8, positive:"), encoding="utf-8")
        bad = cli_here("plan", str(manifest), "--results", str(tmp_path / "r"))
        assert bad.returncode == 2 and "not utf-8" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_file_the_label_table_lists_twice_is_counted_once(tmp_path):
    """A labels CSV naming a file twice under one label keeps it once and counts the extra row; under two
    labels it keeps neither and counts both rows (it used to drop the file as its own duplicate, and
    count one image where two rows went)."""
    from tests.conftest import cli_here

    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{'a' if i % 2 else 'b'}")
    rows += ["000.png,b", "001.png,b"]  # 000 again under its own label; 001 (a) again under b
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: t\ndatasets:\n  d: {{source: csv, root: {tmp_path}, image_column: file, label_column: label}}\n"
                        "labels: {fractions: [1.0]}\nseeds: [0]\n")
    r = cli_here("data", "audit", str(manifest), "--results", str(tmp_path / "r"), "--json")
    d = json.loads(r.stdout)["datasets"]["d"]
    assert d["found"] == 42 and d["used"] == 39, d
    assert d["dropped_by_reason"] == {"listed twice": 3}
    details = sorted(s["detail"] for s in d["skipped"])
    assert details[0].startswith("listed 2 times (under b)") and all("two labels" in x or "2 labels" in x for x in details[1:])


def test_copies_kept_by_the_manifest_s_settings_are_said_and_unmapped_classes_named(tmp_path):
    """dedupe: false and on_conflict: keep keep copies the default drops: the Data line and the audit
    say how many (they were silent); a source class the manifest does not map is named in the verdict
    of an otherwise clean audit."""
    from runner.tables import accounting_line

    root = tmp_path / "f"
    for c, v in (("a", 40), ("b", 200), ("c", 120)):
        for i in range(12):
            _png(root / c / f"{i}.png", v, seed=i)
    (root / "a" / "copy.png").write_bytes((root / "a" / "0.png").read_bytes())  # one extra copy, one label
    (root / "b" / "twice.png").write_bytes((root / "a" / "1.png").read_bytes())  # under two labels
    text = f"name: x\ndatasets:\n  d: {{source: imagefolder, root: {root}, image_size: 16, classes: [a, b], dedupe: false, on_conflict: keep}}\n"
    ds = prepare("d", parse_manifest(text).datasets["d"], tmp_path / "cache")
    acc = accounting(ds)
    assert acc["kept_by_setting"] == {"extra copies of an image (dedupe: false)": 1, "images under two labels (on_conflict: keep)": 2}
    line = accounting_line("d", acc)
    assert "kept by the manifest's settings: 1 extra copies of an image (dedupe: false), 2 images under two labels" in line
    assert acc["used"] == 26 and acc["not_used"] == {"class not selected": 12}

    clean = tmp_path / "clean.yaml"
    clean.write_text(f"name: x\ndatasets:\n  d: {{source: imagefolder, root: {root}, image_size: 16, classes: [a, c]}}\n"
                     "methods: [supervised]\nlabels: {fractions: [1.0]}\n")
    for p in (root / "a" / "copy.png", root / "b" / "twice.png"):
        p.unlink()
    r = run_cli("data", "audit", str(clean), "--results", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean (12 images of 1 source classes not selected, listed above: name them under `exclude:`" in r.stdout
    assert "not selected: b (12)" in r.stdout
