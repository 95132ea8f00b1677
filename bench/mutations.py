"""A mutation check of the science's wiring: hand-written plausible mistakes, applied one at a time to a
copy of the project, each followed by the fast test files that cover its module. A mutation is
*caught* when those tests fail, *survives* when they pass.

    python bench/mutations.py                 # all of them (about 20-30 minutes on 2 cores)
    python bench/mutations.py --only byol     # those whose name or file contains "byol" (a,b: either)
    python bench/mutations.py --list          # the mutations, nothing run
    python bench/mutations.py --json out.json # also the per-mutation results

It prints one line per mutation and ends with the score and the survivors; exit 0 when every
mutation is caught, 1 otherwise. Each mutation is a list of (exact text, replacement) pairs on one
file; a text that is not found exactly once is a bug in this list (exit 2), so an edit of the source
that moves a line makes the list fail loudly instead of testing nothing.

The first seventeen are the ones the wiring issue found no test for; the rest are the same kind of
one-line mistake in the same modules (ml/byol.py, ml/optim.py, ml/augment.py, the pretraining and
selection parts of ml/train.py, ml/metrics.py, stats.py, data/splits.py, the task-id hash in
plan.py, and the worker's use of the splits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the fast test files that cover each module (in-process; no real data set decoded, no subprocess run)
COVERING = {
    "runner/ml/byol.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py"],
    "runner/ml/optim.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py"],
    "runner/ml/augment.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py"],
    "runner/ml/train.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py"],
    "runner/ml/metrics.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py"],
    "runner/stats.py": ["tests/test_wiring.py", "tests/test_stats.py", "tests/test_ml_blocks.py"],
    "runner/data/splits.py": ["tests/test_splits.py", "tests/test_wiring.py"],
    "runner/plan.py": ["tests/test_wiring.py", "tests/test_methods.py"],
    "runner/arms.py": ["tests/test_wiring.py", "tests/test_methods.py"],
    "runner/ml/pretrain.py": ["tests/test_wiring.py", "tests/test_ml_blocks.py", "tests/test_methods.py"],
    "runner/ml/simsiam.py": ["tests/test_methods.py"],
    "runner/worker.py": ["tests/test_wiring.py", "tests/test_stats.py"],
}


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    edits: tuple[tuple[str, str], ...]


def m(name: str, path: str, *edits: tuple[str, str]) -> Mutation:
    return Mutation(name, "runner/" + path, edits)


MUTATIONS = [
    # ---- the seventeen of the wiring issue -------------------------------------------------------
    m("byol: each prediction meets its own view's target", "ml/byol.py",
      ("return byol_loss(p1, z2) + byol_loss(p2, z1), z1", "return byol_loss(p1, z1) + byol_loss(p2, z2), z1")),
    m("train: both views from the same generator state", "ml/pretrain.py",
      ("views = (ctx.view(x, aug1, size, dev_gen), ctx.view(x, aug2, size, dev_gen))",
       "views = (ctx.view(x, aug1, size, torch.Generator(ctx.device).manual_seed(step)), "
       "ctx.view(x, aug2, size, torch.Generator(ctx.device).manual_seed(step)))")),
    m("train: the view-1 preset for both views", "ml/pretrain.py",
      ("ctx.view(x, aug2, size, dev_gen))", "ctx.view(x, aug1, size, dev_gen))")),
    m("byol: pretraining ignores the batch-size scaling of the rate", "ml/byol.py",
      ("self.peak_lr = scaled_lr(spec.base_lr, batch)", "self.peak_lr = spec.base_lr")),
    m("train: pretraining warm-up dropped", "ml/pretrain.py",
      ("warmup = min(int(round((spec.warmup_epochs if own is None else own) * steps_per_epoch)), total // 2)", "warmup = 0")),
    m("augment: solarize on every sample", "ml/augment.py",
      ('p["solarize"] = _bernoulli(aug.solarize_p, n, g, device)', 'p["solarize"] = _bernoulli(1.0, n, g, device)')),
    m("metrics: sensitivity and specificity swapped", "ml/metrics.py",
      ('out["sensitivity"] = tp / (tp + fn) if tp + fn else None', 'out["sensitivity"] = tn / (tn + fp) if tn + fp else None'),
      ('out["specificity"] = tn / (tn + fp) if tn + fp else None', 'out["specificity"] = tp / (tp + fn) if tp + fn else None')),
    m("stats: the report's sensitivity and specificity swapped", "stats.py",
      ('out["sensitivity"], out["specificity"] = recalls[pos], recalls[1 - pos]',
       'out["sensitivity"], out["specificity"] = recalls[1 - pos], recalls[pos]')),
    m("stats: balanced accuracy computed as accuracy", "stats.py",
      ('out["balanced_accuracy"] = np.nanmean(np.stack(recalls), axis=0)', 'out["balanced_accuracy"] = w @ correct / total')),
    m("worker: fine-tune selection on the test split", "worker.py",
      ("(ds.pixels(labels.val), ds.labels[labels.val]) if labels.selecting else None,",
       "(ds.pixels(labels.test), ds.labels[labels.test]) if labels.selecting else None,")),
    m("worker: temperature fitted on the test split", "worker.py",
      ("temperature = fit_temperature(val_probs, ds.labels[labels.val])", "temperature = fit_temperature(probs, ds.labels[labels.test])")),
    m("train: no model selection (the last evaluation kept)", "ml/train.py",
      ('if val_loss < best["val_loss"]:', "if True:")),
    m("plan: dependency ids left out of the task hash", "plan.py",
      ('"deps": [d.id for d in deps],\n', '"deps": [],\n')),
    m("plan: probe settings left out of the linear task's hash", "arms.py",
      ('"linear": ("model", "probe"),', '"linear": ("model",),')),
    m("byol: tau linear instead of cosine", "ml/byol.py",
      ("return 1 - (1 - tau_base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2",
       "return tau_base + (1 - tau_base) * k / max(total_steps, 1)")),
    m("optim: LARS weight decay with the wrong sign", "ml/optim.py",
      ('alpha=group["weight_decay"])', 'alpha=-group["weight_decay"])')),
    m("byol: target BatchNorm statistics not copied", "ml/byol.py",
      ("torch._foreach_copy_(dst, src)", "pass")),
    # ---- more of the same kind ---------------------------------------------------------------------
    m("byol: loss 2 + 2 cos", "ml/byol.py",
      ("return 2 - 2 * F.cosine_similarity(", "return 2 + 2 * F.cosine_similarity(")),
    m("byol: EMA weight on the wrong side", "ml/byol.py",
      ("torch._foreach_lerp_(target, online, 1.0 - tau)", "torch._foreach_lerp_(target, online, tau)")),
    m("pretrain: collapse monitor over the wrong axis", "ml/pretrain.py",
      ("return torch.nn.functional.normalize(z.float(), dim=-1).std(dim=0).mean()",
       "return torch.nn.functional.normalize(z.float(), dim=-1).std(dim=1).mean()")),
    m("byol: heads without BatchNorm", "ml/byol.py",
      ("nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)", "nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True)")),
    m("optim: trust ratio inverted", "ml/optim.py",
      ('group["eta"] * w_norm / g_norm', 'group["eta"] * g_norm / w_norm')),
    m("optim: biases and norms decayed and adapted", "ml/optim.py",
      ("(excluded if p.ndim <= 1 else regular).append(p)", "(excluded if p.ndim < 1 else regular).append(p)")),
    m("optim: momentum ignored", "ml/optim.py",
      ('torch._foreach_mul_(bufs, group["momentum"])', "torch._foreach_mul_(bufs, 0.0)")),
    m("optim: batch scaling inverted", "ml/optim.py",
      ("return base_lr * batch_size / 256", "return base_lr * 256 / batch_size")),
    m("optim: warm-up starts at zero", "ml/optim.py",
      ("return peak * (step + 1) / warmup_steps", "return peak * step / warmup_steps")),
    m("optim: linear decay instead of cosine", "ml/optim.py",
      ("return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))", "return final + (peak - final) * (1 - min(t, 1.0))")),
    m("optim: the backbone's rate scale ignored", "ml/optim.py",
      ('else lr * group.get("lr_scale", 1.0)', 'else lr')),
    m("byol: the target update skipped", "ml/byol.py",
      ("self.model.update_target(tau)", "self.model.update_target(1.0)")),
    m("train: the pretraining floor of steps ignored", "ml/pretrain.py",
      ("would otherwise get a few hundred\n    total = max(spec.epochs * steps_per_epoch, spec.min_steps)",
       "would otherwise get a few hundred\n    total = spec.epochs * steps_per_epoch")),
    m("byol: tau over twice the steps", "ml/byol.py",
      ("tau_at(step, total, self.tau_base)", "tau_at(step, 2 * total, self.tau_base)")),
    m("train: the second view of other images", "ml/pretrain.py",
      ("ctx.view(x, aug2, size, dev_gen))", "ctx.view(x.flip(0), aug2, size, dev_gen))")),
    m("byol: the EMA target saved as the encoder", "ml/byol.py",
      ("return self.model.online_encoder", "return self.model.target_encoder")),
    m("train: the selected weights not restored", "ml/train.py",
      ('model.load_state_dict(best["state"])\n', "pass\n")),
    m("train: probe strength chosen on train loss", "ml/train.py",
      ('probs = full_proba(clf, xva, num_classes)\n        loss = cross_entropy(probs, labels["val"])',
       'probs = full_proba(clf, xtr, num_classes)\n        loss = cross_entropy(probs, labels["train"])')),
    m("worker: probe strength chosen on the test split", "worker.py",
      ('("val", labels.val), ("test", labels.test))', '("val", labels.test), ("test", labels.test))'),
      ('"val": ds.labels[labels.val]}, task.settings.probe', '"val": ds.labels[labels.test]}, task.settings.probe')),
    m("worker: the label budget ignored", "worker.py",
      ("self.train = ds.labeled(budget, task.seed)", 'self.train = ds.splits["train"]')),
    m("worker: pretraining on train and test", "worker.py",
      ('pretrain(ds.pixels(ds.splits["train"]),', 'pretrain(ds.pixels(np.concatenate([ds.splits["train"], ds.splits["test"]])),')),
    m("augment: grayscale probability inverted", "ml/augment.py",
      ('p["gray"] = _bernoulli(aug.grayscale_p, n, g, device)', 'p["gray"] = _bernoulli(1 - aug.grayscale_p, n, g, device)')),
    m("augment: no horizontal flips", "ml/augment.py",
      ("fx = torch.where(_bernoulli(aug.hflip, n, g, device), -1.0, 1.0)", "fx = torch.ones(n, device=device)")),
    m("augment: colour jitter always on", "ml/augment.py",
      ("on = _bernoulli(aug.jitter_p, n, g, device)", "on = _bernoulli(1.0, n, g, device)")),
    m("augment: every sample blurred", "ml/augment.py",
      ("k = n if aug.blur_p >= 1 else int(round(aug.blur_p * n))", "k = n")),
    m("augment: solarize the unchosen samples", "ml/augment.py",
      ('torch.where(p["solarize"].view(n, 1, 1, 1) & (x >= 0.5), 1 - x, x)', 'torch.where(p["solarize"].view(n, 1, 1, 1) | (x >= 0.5), 1 - x, x)')),
    m("augment: no normalization", "ml/augment.py",
      ("return (x - _const(mean, x).view(1, -1, 1, 1)) / _const(std, x).view(1, -1, 1, 1)", "return x")),
    m("augment: crop area fixed at its lower bound", "ml/augment.py",
      ("area = _uniform(*aug.crop_scale, n * CROP_TRIES, g, device)", "area = _uniform(aug.crop_scale[0], aug.crop_scale[0], n * CROP_TRIES, g, device)")),
    m("augment: oversized crops clamped instead of redrawn", "ml/augment.py",
      ("fits = (w_try <= 1) & (h_try <= 1)", "fits = torch.ones_like(w_try, dtype=torch.bool)\n    w_try, h_try = w_try.clamp(max=1), h_try.clamp(max=1)")),
    m("metrics: balanced accuracy as accuracy", "ml/metrics.py",
      ("return float((np.diag(cm)[present] / support[present]).mean())", "return float(np.diag(cm).sum() / cm.sum())")),
    m("metrics: loss summed, not averaged", "ml/metrics.py",
      ("return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())",
       "return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).sum())")),
    m("metrics: confusion matrix transposed", "ml/metrics.py",
      ("np.add.at(cm, (labels, pred), 1)", "np.add.at(cm, (pred, labels), 1)")),
    # (ignoring the positive class for a binary AUROC is no mistake: AUROC(p1, y == 1) = AUROC(1 - p1, y == 0))
    m("metrics: the positive class ignored for sensitivity", "ml/metrics.py",
      ("pos = 1 if positive is None else positive\n        tp =", "pos = 1\n        tp =")),
    m("metrics: no temperature fitted", "ml/metrics.py",
      ("return float(np.exp((lo + hi) / 2))", "return 1.0")),
    m("metrics: uniform prior", "ml/metrics.py",
      ("prior = np.bincount(train_labels, minlength=num_classes) / len(train_labels)", "prior = np.full(num_classes, 1.0 / num_classes)")),
    m("stats: AUROC ties count fully", "stats.py",
      ("return (gp * (below + 0.5 * gn)).sum(1)", "return (gp * (below + gn)).sum(1)")),
    m("stats: the two models on different draws", "stats.py",
      ("a, c = _per_seed(p1, y1, image_w, positive), _per_seed(p2, y2, image_w, positive)",
       "a, c = _per_seed(p1, y1, image_w, positive), "
       "_per_seed(p2, y2, Draws(len(p2), _group_index(groups, len(y2)), b, seed + 1).with_point()[1], positive)")),
    m("stats: a 90% interval", "stats.py",
      ("lo, hi = np.percentile(v, [2.5, 97.5])", "lo, hi = np.percentile(v, [5, 95])")),
    m("stats: test groups ignored", "stats.py",
      ("draws = Draws(len(probs), _group_index(groups, len(labels)), b, seed)", "draws = Draws(len(probs), _group_index(None, len(labels)), b, seed)")),
    m("stats: seeds not resampled", "stats.py", ("if n_seeds > 1 and b:", "if False:")),
    m("stats: AUROC over pooled seeds", "stats.py",
      ("per = _per_seed(probs, labels, image_w, positive)",
       "per = _per_seed(probs, labels, image_w, positive)\n    pooled = seed_metrics(probs.reshape(-1, probs.shape[-1]), np.tile(labels, len(probs)), "
       "np.tile(image_w, len(probs)), positive)\n    per['auroc'] = np.repeat(pooled['auroc'][None], len(probs), 0)")),
    m("stats: Holm without the step-down maximum", "stats.py",
      ("running = max(running, min(1.0, (m - rank) * p_values[i]))", "running = min(1.0, (m - rank) * p_values[i])")),
    m("stats: Bonferroni instead of Holm", "stats.py",
      ("running = max(running, min(1.0, (m - rank) * p_values[i]))", "running = max(running, min(1.0, m * p_values[i]))")),
    m("stats: one seed decides", "stats.py", ("if seeds < 2:", "if seeds < 1:")),
    m("stats: a lower loss read as worse", "stats.py",
      ('better = diff["value"] < 0 if metric in LOWER_IS_BETTER else diff["value"] > 0', 'better = diff["value"] > 0')),
    m("stats: a degenerate cell can win", "stats.py", ("if degenerate[winner]:", "if False:")),
    m("stats: no seed-level test", "stats.py", ("p = None if p_boot is None or p_seeds is None else max(p_boot, p_seeds)", "p = p_boot")),
    m("stats: a bootstrap p of 0", "stats.py", ("return float(min(1.0, 2 * (1 + k) / (len(v) + 1)))", "return float(min(1.0, 2 * k / len(v)))")),
    m("splits: a budget's count rounded down", "data/splits.py",
      ("return math.floor(self.fraction * n_in_class + 0.5)", "return math.floor(self.fraction * n_in_class)")),
    m("splits: budgets of one seed not nested", "data/splits.py",
      ('of_class.sort(key=lambda i: rank(seed, "labels", keys[i]))', 'of_class.sort(key=lambda i: rank(seed + k, "labels", keys[i]))')),
    m("splits: a class with no labeled example allowed", "data/splits.py",
      ("if k < 1:", "if k < 0:")),
    m("splits: groups ignored", "data/splits.py",
      ("members[g].append(i)", "members[f\"{g}#{i}\"].append(i)")),
    m("splits: class shares ignored", "data/splits.py",
      ("score = (need * counts).sum(axis=1)", "score = need.sum(axis=1)")),
    m("splits: the split seed ignored", "data/splits.py",
      ('rank(seed, "split", g)', 'rank(0, "split", g)')),
    m("plan: the seed left out of the task hash", "plan.py",
      ('"kind": kind, "data": fingerprint, "seed": seed, "engine": ENGINE_VERSION,', '"kind": kind, "data": fingerprint, "engine": ENGINE_VERSION,')),
    m("plan: the engine version left out of the task hash", "plan.py",
      ('"seed": seed, "engine": ENGINE_VERSION,', '"seed": seed,')),
    m("plan: the budget left out of the task hash", "plan.py",
      ('"budget": None if budget is None else {"fraction": budget.fraction, "per_class": budget.per_class,',
       '"budget": None if True else {"fraction": budget.fraction, "per_class": budget.per_class,')),
    m("plan: the validation mode left out of the task hash", "plan.py",
      ('"validation": manifest.labels.validation,', "")),
    m("worker: choices on the whole validation split under a budget", "worker.py",
      ('val = ds.validation(budget, task.seed) if task.budget.validation == "budget" else ds.splits["val"]', 'val = ds.splits["val"]')),
    m("worker: validation labels not counted in the budget", "worker.py",
      ('"n_labeled": int(len(labels.train) + len(labels.val)),', '"n_labeled": int(len(labels.train)),')),
    m("splits: validation labels not nested across budgets", "data/splits.py",
      ('of_class.sort(key=lambda i: rank(seed, "validation labels", keys[i]))', 'of_class.sort(key=lambda i: rank(seed + k, "validation labels", keys[i]))')),
    m("splits: validation labels at the full rate", "data/splits.py",
      ("k = min(len(of_class), max(floor, math.floor(rate * len(of_class) + 0.5)))", "k = len(of_class)")),
    # ---- the pretraining methods and the ImageNet-initialised arm (architecture issue, #14) ----------
    m("simsiam: no stop-gradient on the projection", "ml/simsiam.py",
      ("F.cosine_similarity(p.float(), z.float().detach(), dim=-1)", "F.cosine_similarity(p.float(), z.float(), dim=-1)")),
    m("simsiam: each prediction meets its own view's projection", "ml/simsiam.py",
      ("negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2", "negative_cosine(p1, z1) / 2 + negative_cosine(p2, z2) / 2")),
    m("simsiam: one direction only", "ml/simsiam.py",
      ("negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2", "negative_cosine(p1, z2)")),
    m("simsiam: the predictor's rate decays with the schedule", "ml/simsiam.py",
      ('pred["fixed_lr"] = self.peak_lr', "pass")),
    m("pretrain: ImageNet initialisation ignored", "ml/pretrain.py",
      ('weights="DEFAULT" if init == "imagenet" else None', "weights=None")),
    m("plan: the pretraining left out of the task hash", "plan.py",
      ('identity["pretraining"] = pretraining', "pass")),
    m("plan: fine-tune settings left out of the supervised hash", "arms.py",
      ('"supervised": ("model", "finetune"),', '"supervised": ("model",),')),
]


def apply(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutation {mutation.name!r}: {old!r} occurs {count} times in {mutation.path} (expected once)")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(root: Path, files: list[str], timeout: float) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'timeout', seconds, the first failing test)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *files]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t, ""
    seconds = time.perf_counter() - t
    if r.returncode == 0:
        return "survived", seconds, ""
    failed = next((line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))), "")
    return "caught", seconds, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run the mutations whose name or file contains this text (several: comma-separated)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = ap.parse_args()
    parts = [p for p in (args.only or "").split(",") if p]
    chosen = [x for x in MUTATIONS if not parts or any(p in x.name or p in x.path for p in parts)]
    if args.list:
        for i, x in enumerate(chosen, 1):
            print(f"{i:3d}. {x.path}: {x.name}")
        return 0
    with tempfile.TemporaryDirectory(prefix="byol-mutations-") as tmp:
        root = Path(tmp)
        for part in ("runner", "tests", "pyproject.toml"):
            src = REPO / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / part)
        for x in chosen:  # every mutation's text is there before any test runs
            apply(root, x)
            shutil.copy2(REPO / x.path, root / x.path)
        baseline, secs, failed = run_tests(root, sorted({f for fs in COVERING.values() for f in fs}), args.timeout)
        if baseline != "survived":
            print(f"the unmutated tests do not pass ({baseline}: {failed}); fix that first", file=sys.stderr)
            return 2
        print(f"unmutated: the covering tests pass ({secs:.0f} s)", flush=True)
        results = []
        for i, x in enumerate(chosen, 1):
            apply(root, x)
            try:
                outcome, secs, failed = run_tests(root, COVERING[x.path], args.timeout)
            finally:
                shutil.copy2(REPO / x.path, root / x.path)
            results.append({"name": x.name, "path": x.path, "outcome": outcome, "seconds": round(secs, 1), "failed_test": failed})
            print(f"{i:3d}/{len(chosen)} {outcome:8s} {secs:5.0f} s  {x.path}: {x.name}" + (f"  [{failed}]" if failed else ""), flush=True)
    caught = sum(r["outcome"] == "caught" for r in results)
    print(f"\nmutation score: {caught}/{len(results)} caught ({100 * caught / max(len(results), 1):.1f}%)")
    survivors = [r for r in results if r["outcome"] != "caught"]
    for r in survivors:
        print(f"  {r['outcome']}: {r['path']}: {r['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"score": [caught, len(results)], "results": results}, indent=1))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
