"""Zero-shot anomaly maps on synthetic DTD defects (issue 27 item 4): Bayes-PFL (paper 51) vs a WinCLIP-style
zero-shot prompt baseline.

Data (``cliplab.data.anomaly``): the auxiliary split (5 DTD textures, defects polygon / noise / invert) trains
Bayes-PFL; the test split (5 other textures, defects cut-paste / scratch / blotch) is scored: image AUROC, pixel
AUROC and AUPRO (MVTec definition, FPR <= 0.3), overall and per test defect type (image AUROC on the normal
images plus that type's). Patch features: windows of the model's input (WinCLIP-style) for a ResNet, ViT patch
tokens otherwise (``regions/anomaly.py``).

Model: ``--model recipe:cifar10-signal`` (32-px ResNet trained here on CIFAR-10 with template captions: it never saw
a texture nor the words "damaged" or "flawless" in a caption, so its prompts carry almost no anomaly meaning) or a
model folder; a recipe that is not built is refused (this script never starts a build). ``--control tiny`` adds
the same runs on the random-weight tiny model (chance level: what the protocol gives without any signal).

    python benchmarks/anomaly_textures.py [--model recipe:cifar10-signal] [--epochs 10] [--size 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _common import DATA_ROOT, RESULTS_DIR, benchmark_model, header, log, md_table, model_info, write_results
from cliplab.data.anomaly import anomaly_set
from cliplab.eval.anomaly import anomaly_metrics, image_auroc
from cliplab.regions.anomaly import PromptBaseline, patch_features
from cliplab.regions.bayes_pfl import fit_bayes_pfl


def load(spec: str):
    if spec.startswith("recipe:"):
        from cliplab.train.recipes import recipe_model

        recipe_model(spec.split(":", 1)[1], DATA_ROOT, build=False)  # refuses an unbuilt recipe in one line
        return benchmark_model(spec)
    backbone, note = benchmark_model(spec)
    return backbone, NOTES.get(spec, note)


NOTES: dict[str, str] = {}


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return False


def per_defect(test, scores) -> dict[str, float]:
    labels, defects = test.labels, np.array([s.defect for s in test.samples])
    out = {}
    for kind in sorted(test.defects):
        rows = (labels == 0) | (defects == kind)
        out[kind] = image_auroc(labels[rows], scores[rows])
    return out


def run_model(spec: str, aux, test, args) -> list[dict]:
    backbone, note = load(spec)
    log(f"{spec}: {note}")
    with Clock() as feat:
        aux_f = patch_features(backbone, aux.images(), mode=args.mode, size=args.size)
        test_f = patch_features(backbone, test.images(), mode=aux_f.mode, size=aux_f.size)
    log(f"features ({aux_f.mode}, input {aux_f.size}px, grid {aux_f.grid}): {feat.wall:.1f} s")
    rows = []
    with Clock() as base:
        result = PromptBaseline(backbone, args.object).score(test_f, test.size)
    scores, maps = result.scores.numpy(), result.maps.numpy()
    rows.append({"method": "winclip-style prompts (zero-shot)", "train_s": 0.0, "score_wall_s": base.wall,
                 "score_cpu_s": base.cpu, **anomaly_metrics(test.labels, scores, test.masks, maps),
                 "per_defect_image_auroc": per_defect(test, scores)})
    log(f"baseline: {rows[-1]}")
    with Clock() as fit:
        model = fit_bayes_pfl(backbone, aux_f, aux.masks, aux.labels, object_name=args.object, epochs=args.epochs,
                              batch_size=8, lr=args.lr, map_size=args.map_size, seed=0)
    with Clock() as score:
        result = model.predict(test_f, test.size, samples=args.samples, seed=0)
    scores, maps = result.scores.numpy(), result.maps.numpy()
    fitted = model.predict(aux_f, aux.size, samples=args.samples, seed=0)  # its own training images: does it fit?
    on_aux = anomaly_metrics(aux.labels, fitted.scores.numpy(), aux.masks, fitted.maps.numpy())
    rows.append({"method": f"bayes-pfl ({args.epochs} epochs on aux, lr {args.lr:g}, {args.samples} samples)",
                 "on_aux_training_images": on_aux,
                 "train_s": fit.wall, "train_cpu_s": fit.cpu, "score_wall_s": score.wall, "score_cpu_s": score.cpu,
                 **anomaly_metrics(test.labels, scores, test.masks, maps),
                 "per_defect_image_auroc": per_defect(test, scores)})
    log(f"bayes-pfl: {rows[-1]}")
    for row in rows:
        row.update(model=spec, model_info=model_info(backbone), weights_note=note, patch_mode=aux_f.mode,
                   input_size=aux_f.size, grid=list(aux_f.grid), feature_wall_s=feat.wall, feature_cpu_s=feat.cpu)
    return rows


def earlier_rows(model: str) -> dict | None:
    """The rows of the last full run when it used another main model (what this run replaces), else None."""
    path = RESULTS_DIR / "anomaly_textures.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("mode") != "full" or old.get("settings", {}).get("model") == model:
        return old.get("replaces")
    main_model = old["settings"]["model"]
    return {"model": main_model, "weights_note": old["results"][0]["weights_note"], "git": old.get("git"),
            "started": old.get("started"),
            "rows": [{k: r[k] for k in ("method", "image_auroc", "pixel_auroc", "aupro")}
                     for r in old["results"] if r["model"] == main_model]}


def render(record: dict) -> str:
    rows, data = record["results"], record["data"]
    defects, replaces = data["test_defects"], record.get("replaces")
    table = md_table(
        ["model", "method", "image AUROC", "pixel AUROC", "AUPRO", *[f"img AUROC {d}" for d in defects],
         "train s (CPU s)", "score s (CPU s)"],
        [[r["model"], r["method"], r["image_auroc"], r["pixel_auroc"], r["aupro"],
          *[r["per_defect_image_auroc"][d] for d in defects],
          f"{r['train_s']:.0f} ({r.get('train_cpu_s', 0.0):.0f})", f"{r['score_wall_s']:.1f} ({r['score_cpu_s']:.1f})"]
         for r in rows])
    fit_rows = [[r["model"], r["on_aux_training_images"]["image_auroc"], r["on_aux_training_images"]["pixel_auroc"],
                 r["on_aux_training_images"]["aupro"]] for r in rows if "on_aux_training_images" in r]
    fit_table = md_table(["model", "image AUROC", "pixel AUROC", "AUPRO"], fit_rows)
    notes = sorted({f"- {r['model']}: {r['weights_note']}; patch features {r['patch_mode']} at {r['input_size']} px "
                    f"(grid {r['grid'][0]}x{r['grid'][1]}), {r['feature_wall_s']:.0f} s wall "
                    f"({r['feature_cpu_s']:.0f} CPU-s) for both splits" for r in rows})
    body = "\n".join([
        "# Zero-shot anomaly maps on synthetic DTD defects: Bayes-PFL vs WinCLIP-style prompts", "",
        f"Test: {data['test_images']} images ({data['test_anomalous']} anomalous; defects {', '.join(defects)}) "
        f"from 5 DTD textures; Bayes-PFL trained on the auxiliary split: {data['aux_images']} images of 5 other "
        f"textures with other defects ({', '.join(data['aux_defects'])}). {data['size']}-px images; AUPRO to FPR 0.3.",
        "", table, "", *notes, "",
        "Bayes-PFL scored on its own auxiliary training images (does it fit at all?):", "", fit_table, "",
        "The signal model is a 32-px ResNet trained here on CIFAR-10 with template captions: it never saw a texture "
        "or an anomaly word ('damaged', 'flawless', 'defect'), so neither method has a language of anomalies to "
        "read; its 2-layer text tower is what Bayes-PFL's prompts must steer. The tiny model has random weights "
        "(control: chance level). Read these numbers as a check that the pipeline runs end to end at minutes of "
        "CPU, not as a ranking of the methods; the authors train for thousands of steps on real industrial "
        "defects with CLIP ViT-L/14-336. Wall seconds depend on the machine's load (CPU seconds in brackets).",
    ])
    if replaces:
        old = "; ".join(f"{r['method']}: image AUROC {r['image_auroc']:.3f}, pixel AUROC {r['pixel_auroc']:.3f}, "
                        f"AUPRO {r['aupro']:.3f}" for r in replaces["rows"])
        body += (f"\n\nThese rows replace an earlier run (started {replaces['started']}, git {replaces['git']}) on "
                 f"{replaces['model']} ({replaces['weights_note']}), same settings: {old}.")
    if record.get("load_note"):
        body += "\n\n" + record["load_note"]
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--control", default="tiny", help="a random-weight control model ('' for none)")
    parser.add_argument("--object", default="texture")
    parser.add_argument("--size", type=int, default=128, help="image side of the synthetic sets and feature input")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--map-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="Bayes-PFL learning rate (the authors' prompt rate is "
                        "1e-3 over thousands of steps; ~130 steps here)")
    parser.add_argument("--note", default="", help="what --model is, for the report (e.g. a snapshot's provenance)")
    parser.add_argument("--quick", action="store_true", help="10 source images per split, 2 epochs")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.render:
        name = "anomaly_textures" + ("_quick" if args.quick else "")
        record = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        write_results(name, record, render(record))
        return
    limit = 10 if args.quick else None
    if args.quick:
        args.epochs = min(args.epochs, 2)
    record = header("anomaly_textures", __doc__.splitlines()[0], args.quick)
    aux = anomaly_set("aux", root=DATA_ROOT, size=args.size, limit=limit)
    test = anomaly_set("test", root=DATA_ROOT, size=args.size, limit=limit)
    record["data"] = {"aux_images": len(aux), "aux_anomalous": int(aux.labels.sum()),
                      "aux_defects": sorted(aux.defects), "test_images": len(test),
                      "test_anomalous": int(test.labels.sum()),
                      "test_defects": sorted(test.defects), "size": args.size}
    record["settings"] = vars(args)
    if args.note:
        NOTES[args.model] = args.note
    replaces = None if args.quick else earlier_rows(args.model)
    rows = run_model(args.model, aux, test, args)
    if args.control:
        rows += run_model(args.control, aux, test, args)
    record["results"] = rows
    if replaces:
        record["replaces"] = replaces
    write_results("anomaly_textures" + ("_quick" if args.quick else ""), record, render(record))


if __name__ == "__main__":
    main()
