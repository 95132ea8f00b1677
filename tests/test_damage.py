"""Damaged and unwritable state, against copies of a real finished run: a damaged runner.db, a damaged
image cache, a read-only results dir and a full disk each end in one line (exit 2) or in a recovery
that loses no finished task; never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_here, copy_results, run_cli, tiny


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
@pytest.mark.e2e
def test_a_damaged_runner_db_says_how_to_rebuild_it_and_the_rebuild_loses_no_finished_task(tiny_reference, tmp_path, damage):
    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    db = results / "runner.db"
    for side in ("runner.db-wal", "runner.db-shm"):
        (results / side).unlink(missing_ok=True)
    data = db.read_bytes()
    db.write_bytes(os.urandom(len(data)) if damage == "random bytes" else data[: len(data) // 3])

    for cmd in (("status",), ("report",), ("run", str(manifest))):
        line = _one_error_line(run_cli(*cmd, "--results", str(results)))
        assert "runner.db is damaged" in line and "--rebuild-store" in line, line
    plan = cli_here("plan", str(manifest), "--results", str(results))
    assert plan.returncode == 0 and "Traceback" not in plan.stderr, plan.stderr  # the plan needs no history
    assert "runner.db is damaged" in plan.stderr

    rebuilt = run_cli("run", str(manifest), "--results", str(results), "--rebuild-store")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "5 done; 0 workers started" in rebuilt.stdout  # every finished task was found in its folder
    assert "moved the damaged runner.db aside" in rebuilt.stderr
    assert len(list(results.glob("runner.db.damaged-*"))) == 1
    st = cli_here("status", "--results", str(results), "--json")
    assert st.returncode == 0 and all(t["status"] == "done" for t in json.loads(st.stdout)["tasks"])
    assert json.loads((results / "tiny" / "results.json").read_text())["rows"] == \
        json.loads((reference / "tiny" / "results.json").read_text())["rows"]


@pytest.mark.parametrize("damage", ["index junk", "images truncated", "images random", "another entry's images"])
@pytest.mark.e2e
def test_a_damaged_cache_entry_is_decoded_again(tiny_reference, tmp_path, damage):
    """A cache entry damaged or replaced (random bytes of the right size and header, or another data
    set's images.npy of the same shape: each trained a control to a different AUROC without a word) is
    decoded again, said, and the run gives the reference's numbers."""
    import numpy as np

    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    [entry] = [p for p in (results / "cache").iterdir() if (p / "index.json").is_file()]
    images = entry / "images.npy"
    if damage == "index junk":
        (entry / "index.json").write_bytes(b"\x00junk{")
    elif damage == "images truncated":
        images.write_bytes(images.read_bytes()[:1000])
    else:
        good = np.load(images)
        rng = np.random.default_rng(0)
        other = rng.integers(0, 256, good.shape, dtype=np.uint8) if damage == "images random" else good[::-1].copy()
        np.save(images, other)
    plan = cli_here("plan", str(manifest), "--results", str(results))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "damaged cache entry" in plan.stderr and "decoded again" in plan.stderr
    again = run_cli("run", str(manifest), "--results", str(results))
    assert again.returncode == 0 and "0 workers started" in again.stdout, again.stdout + again.stderr
    assert (entry / "images.npy").read_bytes() == next(p for p in (reference / "cache").glob(f"{entry.name}/images.npy")).read_bytes()


def _read_only(path: Path):  # noqa: ANN202
    """`path` made unwritable for this process: a read-only bind mount as root (root ignores file
    modes), the write bits removed otherwise. Returns the undo."""
    if os.getuid() == 0:
        done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        return lambda: subprocess.run(["umount", str(path)], check=True)
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p, m in modes.items():
        p.chmod(m & ~0o222)
    return lambda: [p.chmod(m) for p, m in modes.items()]


@pytest.mark.e2e
def test_a_read_only_results_dir_serves_status_report_and_plan_and_run_says_why(tiny_reference, tmp_path):
    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    undo = _read_only(results)
    try:
        st = cli_here("status", "--results", str(results), "--json")
        assert st.returncode == 0, st.stderr
        assert {t["status"] for t in json.loads(st.stdout)["tasks"]} == {"done"}
        rep = cli_here("report", "--results", str(results), "--format", "csv")
        assert rep.returncode == 0 and rep.stdout.startswith("dataset,labels,method"), rep.stderr
        assert "not written" in rep.stderr and "read-only" in rep.stderr
        page = cli_here("report", "--results", str(results), "--format", "html")  # the page itself, figures inlined
        assert page.returncode == 0 and page.stdout.lstrip().startswith("<!doctype html") and "data:image/png;base64," in page.stdout, page.stderr
        assert "> report.html" in page.stderr
        plan = cli_here("plan", str(manifest), "--results", str(results))
        assert plan.returncode == 0 and "Traceback" not in plan.stderr, plan.stderr
        changed = tmp_path / "changed.yaml"
        changed.write_text(manifest.read_text().replace("min_steps: 5", "min_steps: 6"))
        line = _one_error_line(run_cli("run", str(changed), "--results", str(results)))
        assert "read-only" in line and str(results) in line, line
    finally:
        undo()


@pytest.mark.e2e
def test_a_full_disk_ends_the_run_with_one_line_and_leaves_no_temporary_file(tmp_path):
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        manifest = tiny(tmp_path, pre_epochs=4, ft_steps=5)
        r = run_cli("run", str(manifest), "--results", str(disk / "results"))
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        text = r.stdout + r.stderr
        assert "no space left" in text and "free" in text, text
        # the one true line, last: this disk (a task's, runner.db's or the results dir's, wherever the space ran out) and its free space
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on the disk of {disk / 'results'}") and " MB free)" in last, last
        assert not list((disk / "results").rglob(".*.tmp-*"))
    finally:  # a worker told to stop when the run ended may still be closing its files for a moment
        for _ in range(50):
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the size asked, mounted under tmp_path (root only), unmounted after the test."""
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = []

    def mount(mb: int) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.e2e
def test_an_image_cache_the_disk_cannot_hold_is_refused_before_decoding(tmp_path, small_disk):
    disk = small_disk(2)
    manifest = tmp_path / "big.yaml"  # 400 images of 128 px: 6.5 MB decoded, on a 2 MB disk
    manifest.write_text(tiny(tmp_path).read_text().replace("per_class: 40", "per_class: 200").replace(
        "image_size: 24", "image_size: 128").replace("size: 32", "size: 128"))
    for cmd in ("plan", "run"):
        r = run_cli(cmd, str(manifest), "--results", str(disk / "results"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (cmd, r.returncode, r.stderr[-2000:])
        line = _one_error_line(r) if cmd == "run" else r.stderr.strip().splitlines()[-1]
        assert f"no space left on the disk of {disk / 'results' / 'cache'} for the image cache: 400 images at 128 px need 6 MB" \
            in line and "MB are free" in line, line
        assert not list((disk / "results" / "cache").glob(".*"))


@pytest.mark.e2e
def test_decoding_onto_a_full_disk_is_one_line_and_leaves_no_temporary_entry(tmp_path, small_disk):
    """Colour images whose cache outgrows the disk while decoding (the estimate is the gray layout's):
    a write through a memory map ended plan with SIGBUS (exit 135, nothing said) and left the half
    entry that kept the disk full."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "colour" / cls).mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "colour" / cls / f"{i}.png")
    disk = small_disk(18)  # 300 images of 128 px: 4.7 MB gray (the estimate) + 14 MB RGB written while decoding
    manifest = tmp_path / "colour.yaml"
    manifest.write_text(f"name: colour\ndatasets:\n  c: {{source: imagefolder, root: {tmp_path / 'colour'}, image_size: 128}}\n"
                        "methods: [supervised]\nlabels: {fractions: [1.0]}\nseeds: [0]\n")
    r = run_cli("plan", str(manifest), "--results", str(disk / "results"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on the disk of {disk / 'results' / 'cache'} (") and " MB free)" in line, line
    assert float(line.split(" (")[1].split(" MB")[0]) < 1.0, line  # the tmpfs's free space, not the machine's
    assert not [p for p in (disk / "results").rglob("*") if ".tmp-" in p.name], list((disk / "results").rglob("*"))


def _task_of(results: Path, kind: str, **match) -> Path:
    for d in sorted((results / "tasks").iterdir()):
        spec = json.loads((d / "task.json").read_text())
        if spec["kind"] == kind and all((spec.get("budget") or {}).get(k) == v for k, v in match.items()):
            return d
    raise AssertionError(f"no {kind} task {match}")


@pytest.mark.e2e
def test_a_damaged_encoder_reopens_its_pretraining_and_a_damaged_checkpoint_is_set_aside(tiny_reference, tmp_path):
    """encoder.pt overwritten: the pretraining's recorded checksum no longer matches, so it is computed
    again (not its dependants, whose results stand), with a line saying so. A checkpoint that cannot be
    read is moved aside and the task trains from step 0: the same numbers as the uninterrupted run."""
    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    pre = _task_of(results, "pretrain")
    good = (pre / "encoder.pt").read_bytes()
    (pre / "encoder.pt").write_bytes(good[: len(good) // 2])
    sup = _task_of(results, "supervised", fraction=1.0)
    (sup / "metrics.json").unlink()
    (sup / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")

    r = run_cli("run", str(manifest), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 workers started" in r.stdout
    assert f"({pre.name}): its encoder.pt is missing or does not match the checksum its metrics.json recorded: computed again" in r.stderr
    assert (pre / "encoder.pt").read_bytes() == good  # the same pretraining gives the same encoder
    events = (sup / "events.jsonl").read_text()
    assert "checkpoint.pt could not be read" in events and "training starts from step 0" in events
    assert (sup / "checkpoint.pt.damaged").is_file()
    ref = json.loads((reference / "tasks" / sup.name / "metrics.json").read_text())
    got = json.loads((sup / "metrics.json").read_text())
    assert got["test"] == ref["test"] and got["predictions"] == ref["predictions"]


@pytest.mark.e2e
def test_undecodable_event_lines_are_skipped(tiny_reference, tmp_path):
    """Random bytes appended to a task's events.jsonl (a disk error, a hand): the report and status read
    around them (the curves lose only those lines)."""
    _, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    pre = _task_of(results, "pretrain")
    good = (pre / "events.jsonl").read_text()
    with open(pre / "events.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n" + os.urandom(300) + b"\n{\"kind\": \"metric\", \"loss\": \n")
    r = cli_here("report", "--results", str(results), "--format", "csv")
    assert r.returncode == 0 and r.stdout.startswith("dataset,labels,method") and "Traceback" not in r.stderr, r.stderr
    assert cli_here("status", "--results", str(results)).returncode == 0
    from runner.contracts import read_events

    assert read_events(pre / "events.jsonl")[0] == read_events_text(good)


def read_events_text(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.e2e
def test_swapped_metrics_files_are_never_published_as_the_other_tasks_result(tiny_reference, tmp_path):
    """The fine-tune's and the supervised classifier's metrics.json swapped by hand (25% labels): `report`
    and `status` read neither as the other's (the table shows '—' where they were, a note names both,
    status marks them damaged), and `run` computes both again: the reference table comes back."""
    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    ft, sup = _task_of(results, "finetune", fraction=0.25), _task_of(results, "supervised", fraction=0.25)
    a, b = (ft / "metrics.json").read_text(), (sup / "metrics.json").read_text()
    (ft / "metrics.json").write_text(b)
    (sup / "metrics.json").write_text(a)

    rep = cli_here("report", "--results", str(results))
    assert rep.returncode == 0, rep.stderr
    row = next(line for line in rep.stdout.splitlines() if line.startswith("| syn (25% labels)"))
    assert row.count("—") == 4, row  # neither Model 1's nor Model 2's accuracy and loss
    assert "Left out: 2 task(s) recorded done whose metrics.json is missing, unreadable or another task's" in rep.stdout
    assert ft.name[:8] in rep.stdout and sup.name[:8] in rep.stdout
    st = json.loads(cli_here("status", "--results", str(results), "--json").stdout)
    damaged = {t["id"] for t in st["tasks"] if t["status"] == "damaged"}
    assert damaged == {ft.name, sup.name}

    r = run_cli("run", str(manifest), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    ref = (reference / "tiny" / "results.md").read_text().split("\n\n")[0]
    assert (results / "tiny" / "results.md").read_text().split("\n\n")[0] == ref


@pytest.mark.e2e
def test_a_resume_with_another_max_parallel_keeps_the_thread_count_its_finished_tasks_used(tiny_reference, tmp_path):
    """On the CPU the thread count (cores / max_parallel) changes a task's numbers in their last digits: a
    resume at another --max-parallel gives the task it retrains the count the finished ones recorded, says
    so, and so publishes the numbers an uninterrupted run gave."""
    import json

    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    sup = _task_of(results, "supervised", fraction=1.0)
    recorded = json.loads((sup / "metrics.json").read_text())["environment"]["threads"]
    (sup / "metrics.json").unlink()
    cores = os.cpu_count() or 1
    other = 1 if recorded != cores else 2  # --max-parallel giving another count than the reference's
    now = max(1, cores // other)
    if now == recorded:
        pytest.skip(f"{cores} cores: no --max-parallel gives another thread count than {recorded}")
    r = run_cli("run", str(manifest), "--results", str(results), "--max-parallel", str(other))
    assert r.returncode == 0, r.stderr
    assert (f"each task trains with {recorded} CPU thread(s), the count this results dir's" in r.stderr
            and f"cores / max_parallel would give {now}" in r.stderr), r.stderr
    assert json.loads((sup / "metrics.json").read_text())["environment"]["threads"] == recorded
    ref = (reference / "tiny" / "results.md").read_text().split("\n\n")[0]
    assert (results / "tiny" / "results.md").read_text().split("\n\n")[0] == ref
    r = run_cli("report", "--results", str(results), "--docs", str(tmp_path / "docs"))
    assert r.returncode == 0, r.stderr
    assert f"; {recorded} CPU thread(s) per task;" in (tmp_path / "docs" / "tiny.md").read_text()


@pytest.mark.e2e
def test_fifos_in_place_of_a_runs_files_hang_no_command(tiny_reference, tmp_path):
    """What bench/damage.py found: a FIFO where a metrics.json was hung `status` (and every reader of
    it), one where the run's manifest.yaml copy was hung `run`, and an empty model.pt gave `predict` a
    traceback. Each command now finishes: status and report leave the task out and say so, run trains
    the task again and publishes the reference's numbers, predict names the file in one line."""
    from PIL import Image

    manifest, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    sup = _task_of(results, "supervised", fraction=1.0)
    ft = _task_of(results, "finetune", fraction=1.0)
    (sup / "metrics.json").unlink()
    os.mkfifo(sup / "metrics.json")
    figure = sorted((results / "tiny" / "figures").glob("*.png"))[0]
    figure.unlink()
    os.mkfifo(figure)
    (results / "tiny" / "manifest.yaml").unlink()
    os.mkfifo(results / "tiny" / "manifest.yaml")
    (ft / "model.pt").write_bytes(b"")

    r = run_cli("status", "--results", str(results), timeout=60)
    assert r.returncode == 0 and "damaged" in r.stdout, r.stdout + r.stderr
    r = run_cli("report", "--results", str(results), "--format", "md", timeout=90)
    assert r.returncode == 0 and f"missing, unreadable or another task's ({sup.name[:8]})" in r.stdout, r.stdout + r.stderr
    image = tmp_path / "one.png"
    Image.new("L", (32, 32), 90).save(image)
    r = run_cli("predict", ft.name, str(image), "--results", str(results), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a readable model file (EOFError)" in r.stderr, r.stderr

    r = run_cli("run", str(manifest), "--results", str(results), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (results / "tiny" / "manifest.yaml").is_file() and figure.is_file()
    ref = (reference / "tiny" / "results.md").read_text().split("\n\n")[0]
    assert (results / "tiny" / "results.md").read_text().split("\n\n")[0] == ref


@pytest.mark.e2e
def test_predict_refuses_a_model_file_of_another_task(tiny_reference, tmp_path):
    """bench/damage.py found it: another task's model.pt (of this run or another, of the same kind)
    in a classifier's folder was scored by `predict` as that classifier, with nothing said. It is
    refused in one line naming both tasks (`run` trains that task again: the file no longer matches the
    checksum its metrics.json recorded, as the checksum tests above hold); the other task still scores."""
    from PIL import Image

    _, reference, _ = tiny_reference
    results = copy_results(reference, tmp_path / "results")
    sup = _task_of(results, "supervised", fraction=1.0)
    ft = _task_of(results, "finetune", fraction=1.0)
    (sup / "model.pt").write_bytes((ft / "model.pt").read_bytes())
    image = tmp_path / "one.png"
    Image.new("L", (32, 32), 90).save(image)
    r = cli_here("predict", sup.name, str(image), "--results", str(results))
    assert r.returncode == 2 and f"is the classifier of task {ft.name}, not of task {sup.name}" in r.stderr, r.stderr
    r = cli_here("predict", ft.name, str(image), "--results", str(results))
    assert r.returncode == 0, r.stderr
