"""`byol-runner predict TASK_ID IMAGES...`: a finished classifier's calibrated probabilities for new images.

The task's model.pt (runner/ml/saved.py) says how its images were prepared; each file here is
decoded as the data set's images were (the cache's decoder: size, fit, channel count), scored as the
task scored its test split (the evaluation view, in batches of the same size) and calibrated by the
task's temperature. IMAGES are files, folders (their image files, recursively) or CSV files (a
`path` column, else the first; relative paths are from the CSV's folder). An unreadable file gets an
error line and the rest are still scored; the exit code is then 1.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from runner.errors import UserError

BATCH = 256  # the scoring batch of the task's own test split (runner.ml.train.predict)


def find_task(results: Path, task: str) -> Path:
    """tasks/<id> for a task id or a unique prefix of one (at least 4 characters)."""
    tasks = results / "tasks"
    if (tasks / task).is_dir():
        return tasks / task
    if len(task) < 4 or not tasks.is_dir():
        raise UserError(f"no task {task!r} under {tasks} (give a task id, or at least 4 of its first characters; "
                        "`byol-runner status` lists them)")
    hits = sorted(p for p in tasks.iterdir() if p.name.startswith(task))
    if len(hits) != 1:
        raise UserError(f"{len(hits)} tasks under {tasks} start with {task!r}" + (f": {', '.join(h.name for h in hits[:5])}" if hits else
                        " (`byol-runner status` lists them)"))
    return hits[0]


def image_paths(args: list[str], axis: str = "axial") -> list[Path]:
    """Every image the arguments name, in the order given (a folder's sorted); a volume (NIfTI, a
    multi-frame DICOM file) as one path a slice, `file#0042`."""
    from runner.data.sources import is_image_name

    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and is_image_name(f.name, str(f))
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.suffix.lower() == ".csv" and p.is_file():
            out += _csv_paths(p)
        else:
            out.append(p)  # a missing file gets its error line with the others
    if not out:
        raise UserError("no images: give image files, folders of them, or a CSV with a path column")
    return _slices(out, axis)


def _slices(paths: list[Path], axis: str) -> list[Path]:
    from runner.data import medical

    out: list[Path] = []
    for p in paths:
        kind = medical.file_kind(str(p))
        try:
            count = (medical.nifti_slices(str(p), axis) if kind == "nifti" else
                     medical.read_dicom_header(str(p))["frames"] if kind == "dicom" else 1)
        except medical.MedicalError:
            count = 1  # its error line comes with the others
        volume = kind == "nifti" and count >= 1 or count > 1
        out += [Path(k) for k in medical.slice_keys(str(p), count)] if volume else [p]
    return out


def _csv_paths(path: Path) -> list[Path]:
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    column = "path" if "path" in rows[0] else next(iter(rows[0]))
    return [(path.parent / r[column].strip()) if not Path(r[column].strip()).is_absolute() else Path(r[column].strip())
            for r in rows if (r.get(column) or "").strip()]


def predict(results: Path, task: str, images: list[str], device: str = "cpu") -> dict:
    """{"task", "classes", "positive", "temperature", "rows": [{"path", "probs"|None, "predicted", "error"}]}."""
    import torch

    from runner.data.cache import as_channels
    from runner.data.decode import ImageSettings, decode_file
    from runner.ml import saved
    from runner.ml.train import Context
    from runner.system import resolve_device

    folder = find_task(results, task)
    try:
        model = saved.load(folder / "model.pt", folder.name)
    except saved.ModelFileError as e:
        kind = _kind(folder)
        why = f" (a {kind} task has no classifier)" if kind in ("pretrain", "noop", "evaluate") else ""
        raise UserError(f"task {folder.name}{why}: {e}") from None
    ctx = Context(device=resolve_device(device), run=saved.scoring_run(model, device), task_dir=folder, seed=0,
                  emit=lambda *a, **k: None)
    try:
        scorer = saved.Scorer(model, results, ctx.device, ctx)
    except saved.ModelFileError as e:
        raise UserError(f"task {folder.name}: {e}") from None
    img = model["image"]
    windows = tuple(tuple(w) for w in img["windows"]) if img.get("windows") else None
    settings = ImageSettings(img["image_size"], img["fit"], windows, img.get("slice_axis", "axial"))
    rows, pixels, ok = [], [], []
    for path in image_paths(images, settings.axis):
        d = decode_file(str(path), settings)
        if d.error is not None or d.pixels is None:
            rows.append({"path": str(path), "probs": None, "predicted": None, "error": d.error or "unreadable"})
            continue
        pixels.append(as_channels(d, int(img["channels"])))
        ok.append(len(rows))
        rows.append({"path": str(path), "probs": None, "predicted": None, "error": None})
    if pixels:
        with torch.no_grad():
            probs = np.concatenate([scorer.probs(np.stack(pixels[i:i + BATCH])) for i in range(0, len(pixels), BATCH)])
        names = model["class_names"]
        for i, p in zip(ok, probs):
            rows[i]["probs"] = {n: float(v) for n, v in zip(names, p)}
            rows[i]["predicted"] = names[int(np.argmax(p))]
    return {"task": model["task"], "kind": model["kind"], "classes": model["class_names"],
            "positive": model["class_names"][model["positive"]] if model["positive"] is not None else None,
            "temperature": model["temperature"], "rows": rows}


def _kind(folder: Path) -> str | None:
    from runner.atomic import read_json

    try:
        return read_json(folder / "task.json").get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", *(f"p_{c}" for c in result["classes"]), "predicted", "error"])
    for r in result["rows"]:
        probs = [repr(r["probs"][c]) if r["probs"] else "" for c in result["classes"]]
        w.writerow([r["path"], *probs, r["predicted"] or "", r["error"] or ""])
    return buf.getvalue()


def lines(result: dict) -> list[str]:
    """One line per image, for a person: the predicted class and the positive class's probability."""
    pos = result["positive"]
    out = []
    for r in result["rows"]:
        if r["error"]:
            out.append(f"{r['path']}\terror: {r['error']}")
            continue
        shown = [pos] if pos else result["classes"]
        probs = "  ".join(f"p({c}) {r['probs'][c]:.4f}" for c in shown)
        out.append(f"{r['path']}\t{r['predicted']}\t{probs}")
    return out


def failed(result: dict) -> int:
    return sum(1 for r in result["rows"] if r["error"])
