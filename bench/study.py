"""The study's arms on one data set at real scale, side by side: supervised (Model 2), BYOL fine-tune
and BYOL linear probe (Model 1), and the random-init linear probe (the control).

    python bench/study.py --root ../shared/data/chest_xray --out /tmp/study [--size 128] [--epochs 80]
    python bench/study.py --manifest experiments/matrix.yaml --dataset hemorrhage --out /tmp/ct

Defaults are the chest X-ray protocol of the training-engine issue: Kermany images pooled and split
70/15/15 by patient id, ResNet50 at 128 px, 80 BYOL epochs, one seed, 1% / 10% / 100% labels. With
--manifest and --dataset, the data set (source, classes, split) is that manifest's, its root as the
manifest resolves it (BYOL_DATA). Each arm is a real task run by the worker (task.json in,
metrics.json out). Prints a markdown table of test accuracy / AUROC / loss, with the loss of
predicting the labeled set's class frequencies (the prior) beside it, and a JSON line with
everything, and writes both under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from runner.worker.run import main as run_worker

KERMANY_PATIENT = r"(person\d+)_|((?:NORMAL2-)?IM-\d+)-"
ARMS = ("supervised", "finetune", "linear", "random-linear")


def chest_data(root: str, size: int) -> dict:
    return {
        "source": "imagefolder", "root": root, "split_dirs": {"train": "train", "val": "val", "test": "test"},
        "classes": {"normal": ["NORMAL"], "pneumonia": ["PNEUMONIA"]}, "positive": "pneumonia", "image_size": size,
        "split": {"strategy": "stratified", "val": 0.15, "test": 0.15, "group_pattern": KERMANY_PATIENT},
    }


def manifest_data(manifest: str, dataset: str, size: int) -> dict:
    from runner.manifest import load_manifest
    from runner.plan import data_spec

    datasets = load_manifest(manifest).datasets
    if dataset not in datasets:
        raise SystemExit(f"{manifest} has no data set {dataset!r}; it has {', '.join(datasets)}")
    return {**data_spec(datasets[dataset]), "image_size": size}


def write_task(results: Path, spec: dict) -> Path:
    d = results / "tasks" / spec["id"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "task.json").write_text(json.dumps(spec, indent=1))
    return d / "task.json"


def run(spec_path: Path) -> dict:
    metrics = spec_path.parent / "metrics.json"
    if not metrics.exists():
        t0 = time.perf_counter()
        rc = run_worker(str(spec_path))
        if rc != 0:
            tail = (spec_path.parent / "events.jsonl").read_text().splitlines()[-1]
            raise SystemExit(f"{spec_path.parent.name} failed with exit {rc}: {tail}")
        print(f"  {spec_path.parent.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return json.loads(metrics.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="the chest X-ray folder (Kermany layout)")
    ap.add_argument("--manifest", help="take the data set from this manifest instead (with --dataset)")
    ap.add_argument("--dataset", help="the data set's name in --manifest")
    ap.add_argument("--out", required=True, help="results dir of the study (tasks, cache, table)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--head-dims", default="4096,256", help="projector/predictor hidden and output widths")
    args = ap.parse_args()
    if bool(args.manifest) == bool(args.root) or bool(args.manifest) != bool(args.dataset):
        ap.error("give --root (chest X-ray), or --manifest with --dataset")
    results = Path(args.out).resolve()
    hidden, out_dim = map(int, args.head_dims.split(","))
    settings = {
        "model": {"arch": args.arch},
        "run": {"device": args.device, "compile": args.compile, "progress_every_s": 5, "checkpoint_every_steps": 500},
        "pretrain": {"epochs": args.epochs, "min_steps": 0, "batch_size": args.batch, "proj_hidden": hidden, "pred_hidden": hidden, "proj_dim": out_dim},
        "finetune": {"epochs": args.finetune_epochs},
    }
    if args.manifest:
        name, data = args.dataset, manifest_data(args.manifest, args.dataset, args.size)
    else:
        name, data = "chest_xray", chest_data(str(Path(args.root).resolve()), args.size)
    base = {"dataset": name, "data": data, "seed": args.seed, "settings": settings}
    t0 = time.perf_counter()
    pre = run(write_task(results, {**base, "id": "pretrain", "kind": "pretrain"}))
    events = [json.loads(x) for x in (results / "tasks" / "pretrain" / "events.jsonl").read_text().splitlines()]
    rates = [e["img_per_s"] for e in events if e.get("kind") == "progress" and "img_per_s" in e]
    epochs = [e for e in events if e.get("kind") == "metric"]
    rows, table = [], {}
    for frac in map(float, args.fractions.split(",")):
        for arm in ARMS:
            spec = {**base, "id": f"{arm}-{frac:g}", "kind": arm, "budget": {"fraction": frac}}
            if arm in ("finetune", "linear"):
                spec["encoder"] = "tasks/pretrain/encoder.pt"
            m = run(write_task(results, spec))
            t = m["test"]
            table[(frac, arm)] = t
            rows.append({"fraction": frac, "arm": arm, "n_labeled": m["n_labeled"], "accuracy": t["accuracy"], "auroc": t["auroc"],
                         "loss": t["loss"], "prior_loss": m.get("prior_loss"), "loss_uncalibrated": t["loss_uncalibrated"], "balanced_accuracy": t["balanced_accuracy"],
                         "selection": m["selection"], "seconds": m["seconds"]})
    lines = ["| labels | " + " | ".join(ARMS) + " | prior loss |", "|---|" + "---|" * (len(ARMS) + 1)]
    for frac in map(float, args.fractions.split(",")):
        row = next(r for r in rows if r["fraction"] == frac)
        cells = [f"{table[(frac, a)]['accuracy']:.3f} / {table[(frac, a)]['auroc']:.3f} / {table[(frac, a)]['loss']:.3f}" for a in ARMS]
        prior = f"{row['prior_loss']:.3f}" if row.get("prior_loss") is not None else "-"
        lines.append(f"| {frac * 100:g}% ({row['n_labeled']}) | " + " | ".join(cells) + f" | {prior} |")
    md = (f"{name}: test accuracy / AUROC / loss (calibrated on val); prior loss: the test loss of predicting the "
          "labeled set's class frequencies\n\n" + "\n".join(lines))
    summary = {
        "study": name, "arch": args.arch, "image_size": args.size, "byol_epochs": args.epochs, "batch": args.batch,
        "seed": args.seed, "pretrain_seconds": pre.get("seconds"), "pretrain_img_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "byol_loss_first_epoch": epochs[0]["loss"] if epochs else None, "byol_loss_last_epoch": epochs[-1]["loss"] if epochs else None,
        "proj_std_last": epochs[-1].get("proj_std") if epochs else None, "total_seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    (results / "study.md").write_text(md + "\n")
    (results / "study.json").write_text(json.dumps(summary, indent=1))
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
