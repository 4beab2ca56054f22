"""Cross-modal distillation (paper 8, the ``distill`` objective) on CIFAR-10: a small student from a cached teacher.

Teacher: ``recipe:cifar10-signal`` (a 32-px ResNet CLIP trained on the CIFAR-10 train images with template captions:
it knows the classes). Its embeddings are computed once and cached (``embed_images`` of the CIFAR-10 train split,
``encode_texts`` of the 180 template captions): the student never runs the teacher, as with DCLIP's cached
cross-attention teacher. Student: a smaller 32-px ResNet CLIP in the teacher's width (``STUDENT``: stages
[1, 1, 1, 1] of width 16, a one-block text tower of width 64; seeded random init, the same for every lambda), trained
``--steps`` steps (batch ``--batch-size``, AdamW, lr ``--lr``, cosine with ``--warmup`` steps) on the CIFAR-10 train
split (9,000 images, the val hold-out left out; one cifar10 template caption per image drawn by the step's seed, no
augmentation) with ``loss = lam * InfoNCE + (1 - lam) * (1 - cos(student, teacher))`` averaged over images and
texts, for each ``--lams`` (1 = the CLIP loss alone, 0 = the teacher's embeddings alone).

Evaluation on ``--test-items`` seeded CIFAR-10 test images (never used in training or choice): zero-shot top-1
(cifar10 templates, CLIP's ensembling) and leave-one-out image -> image precision@1/@10 (retrieval), for the teacher,
the student at init and each trained student.

    python benchmarks/distill_cifar10.py [--steps 60] [--lams 1,0.5,0] [--test-items 2000]
"""

from __future__ import annotations

import argparse
import math
import tempfile

import numpy as np
import torch

from _common import DATA_ROOT, CpuAccount, built_model, header, log, md_table, model_info, write_results
from cliplab.cli.retrieval_tune import evaluate_model
from cliplab.data import Subset, load_dataset
from cliplab.data.prompts import fill_template, load_templates
from cliplab.train.engine import TrainSettings, get_objective, run_training

STUDENT = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def make_student(seed: int, embed_dim: int = 256):
    """A trainable Backbone of ``STUDENT`` (in ``embed_dim``, the teacher's width) with weights drawn from ``seed``."""
    import open_clip

    from cliplab.models.backbone import BackboneInfo
    from cliplab.models.openclip import OpenClipBackbone, transform_for
    from cliplab.train.loop import build_model, build_tokenizer

    config = {**STUDENT, "embed_dim": embed_dim}
    model = build_model(config, seed, "clip")
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mode": "RGB", "mean": MEAN, "std": STD,
                                               "interpolation": "bicubic", "resize_mode": "shortest",
                                               "fill_color": 0})
    info = BackboneInfo(name="distill-student-rn-32px", pretrained="random", source="open_clip", quick_gelu=False,
                        random_weights=True, benchmark=("distill-student-rn-32px", "random"))
    base = OpenClipBackbone(model, transform_for(model), build_tokenizer(config), info,
                            f"distill-student:seed{seed}")
    return base.derive("distill", trainable=True)


def train_tensors(train) -> torch.Tensor:
    """The train images as the student's normalised (n, 3, 32, 32) float32 input."""
    array = np.stack([np.asarray(train.load_image(i).convert("RGB"), dtype=np.uint8) for i in range(len(train))])
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def batches(images, labels, captions, teacher_images, teacher_texts, tokenize, batch_size: int, seed: int):
    """``data(epoch, start)`` for ``run_training``: seeded epochs of full batches, one template caption per image
    (caption id = label * T + template), the teacher rows of the batch's images and captions."""
    n_templates = len(captions) // (int(labels.max()) + 1)

    def data(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))
        per_epoch = len(order) // batch_size
        for position in range(start, per_epoch):
            idx = order[position * batch_size:(position + 1) * batch_size]
            rng = np.random.default_rng([seed, epoch, position])
            ids = labels[idx] * n_templates + rng.integers(0, n_templates, len(idx))
            unique, index = np.unique(ids, return_inverse=True)
            yield {"images": images[idx], "tokens": tokenize([captions[k] for k in unique]),
                   "text_index": torch.from_numpy(index.astype(np.int64)),
                   "teacher_images": teacher_images[idx], "teacher_texts": teacher_texts[ids]}

    return data


SAME = ("teacher", "steps", "batch_size", "lr", "warmup", "test_items", "train_items", "seed")


def kept_runs(args) -> list[dict]:
    """The runs of the existing results file whose settings in ``SAME`` equal this run's."""
    import json

    from _common import RESULTS_DIR

    path = RESULTS_DIR / "distill_cifar10.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if any(old["settings"].get(k) != getattr(args, k) for k in SAME):
        log("--keep: the results file was made with other settings; not kept")
        return []
    return old["runs"]


def render(record: dict) -> str:
    """The markdown of a results record (its notes at the end)."""
    args = argparse.Namespace(**record["settings"])
    note, runs, results = record["weights"], record["runs"], record["results"]
    params, teacher_params, teacher_cpu = (record["student_parameters"], record["teacher_parameters"],
                                           record["teacher_embedding_cpu"])
    n_train, n_test = record["sizes"]["train"], record["sizes"]["test"]
    epochs = args.steps * args.batch_size / n_train
    md = [f"# Cross-modal distillation (paper 8) on CIFAR-10 · teacher {args.teacher}", "",
          f"**Teacher weights: {note}.** Student: a 32-px ResNet CLIP, stages [1, 1, 1, 1] of width 16, text tower "
          f"1 block of width 64, embed dim 256 ({params / 1e6:.2f} M parameters vs the teacher's "
          f"{teacher_params / 1e6:.2f} M; most of both are the 49,408-token embedding table), random init (seed "
          f"{args.seed}, the same for every lambda). Training: {args.steps} steps of {args.batch_size} "
          f"({epochs:.2f} epochs of {n_train:,} CIFAR-10 train images, one template caption each), AdamW lr "
          f"{args.lr}, weight decay 0.1, cosine, warmup {args.warmup}; the teacher's embeddings cached once "
          f"({teacher_cpu['wall_s']:.0f} s). Loss: lam * InfoNCE + (1 - lam) * mean over images and texts of "
          "(1 - cos(student, teacher)).", "",
          md_table(["model", "zero-shot top-1", "image->image P@1", "image->image P@10", "train wall s",
                    "train CPU s"],
                   [[label, f"{100 * m['zero-shot top-1']:.2f}", f"{100 * m['image->image P@1']:.2f}",
                     f"{100 * m['image->image P@10']:.2f}",
                     *(next(((r["train_cpu"]["wall_s"], r["train_cpu"]["own_cpu_s"]) for r in runs
                             if label == f"student lam={r['lam']:g}"), ("", "")))]
                    for label, m in results.items()]), "",
          f"Numbers in %, on {n_test:,} seeded CIFAR-10 test images (chance 10%). lam = 1 is the CLIP loss alone "
          "(no teacher), lam = 0 the teacher's embeddings alone.", "",
          md_table(["student", "InfoNCE", "1 - cos(student, teacher)", "logit scale"],
                   [[f"lam={r['lam']:g}", r["last_logs"]["infonce"], r["last_logs"]["cosine"], r["logit_scale"]]
                    for r in runs]), "",
          "Both loss terms after training on the first training batch (InfoNCE at the student's own temperature).",
          ""]
    if not math.isfinite(runs[-1]["logit_scale"]):
        md.append("A student's logit scale is not finite: see the JSON.")
    md += record.get("notes", [])
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="recipe:cifar10-signal")
    parser.add_argument("--lams", default="1,0.5,0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--test-items", type=int, default=2000)
    parser.add_argument("--train-items", type=int, default=None, help="CIFAR-10 train images (default: all 9,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the runs of results/distill_cifar10.json made with "
                        "the same settings (run the lambdas in parts)")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from results/distill_cifar10.json")
    args = parser.parse_args()
    if args.render:
        import json

        from _common import RESULTS_DIR, environment_md

        record = json.loads((RESULTS_DIR / "distill_cifar10.json").read_text())
        (RESULTS_DIR / "distill_cifar10.md").write_text(render(record).rstrip() + "\n\n" + environment_md(record))
        return
    torch.set_num_threads(2)
    lams = [float(v) for v in args.lams.split(",")]
    teacher, note = built_model(args.teacher, held_label="val zero-shot", after=": it knows these ten classes",
                                random_note="random weights: the numbers say nothing about the method")
    train = load_dataset("cifar10", DATA_ROOT, "train")
    if args.train_items:
        train = Subset(train, np.sort(np.random.default_rng([args.seed, 1]).permutation(len(train))[:args.train_items]))
    test = load_dataset("cifar10", DATA_ROOT, "test")
    test = Subset(test, np.sort(np.random.default_rng([args.seed, 2]).permutation(len(test))[:args.test_items]))
    labels = np.asarray(train.labels, dtype=np.int64)
    templates = load_templates("cifar10")
    captions = [fill_template(t, c) for c in train.class_names for t in templates]
    record = header("distill_cifar10", __doc__.splitlines()[0], quick=False)
    with tempfile.TemporaryDirectory() as cache:
        from cliplab.features.embed import embed_images

        with CpuAccount() as teacher_cpu:
            found = embed_images(teacher, train, cache, num_workers=0, progress=False)
            teacher_images = np.empty((len(train), teacher.embed_dim), dtype=np.float32)
            teacher_images[np.asarray(found.indices)] = found.features
            teacher_texts = teacher.encode_texts(captions).numpy()
        log(f"teacher embeddings: {teacher_cpu.result['wall_s']:.1f} s")
        images = train_tensors(train)
        results = {"teacher": evaluate_model(teacher, test, "cifar10", cache, workers=0)}
        student0 = make_student(args.seed, teacher.embed_dim)
        results["student at init"] = evaluate_model(student0, test, "cifar10", cache, workers=0)
        log(f"teacher {results['teacher']}; init {results['student at init']}")
        runs = kept_runs(args) if args.keep else []
        for lam in lams:
            if any(r["lam"] == lam for r in runs):
                continue
            student = make_student(args.seed, teacher.embed_dim)
            data = batches(images, labels, captions, torch.from_numpy(teacher_images), torch.from_numpy(teacher_texts),
                           student.tokenize, args.batch_size, args.seed)
            settings = TrainSettings(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                                     device="cpu", progress=False, desc=f"distill lam {lam}", weight_decay=0.1)
            with CpuAccount() as cpu:
                trained = run_training(student, get_objective("distill", lam=lam), data, settings)
            with tempfile.TemporaryDirectory() as own_cache:
                metrics = evaluate_model(student, test, "cifar10", own_cache, workers=0)
            with torch.no_grad():  # both terms on the first batch of epoch 0, after training (lam 0.5 to get both)
                _, last = get_objective("distill", lam=0.5)(student, next(iter(data(0))))
            last = {"infonce": last["infonce"], "cosine": last["cosine"], "last_loss": trained.last_loss}
            runs.append({"lam": lam, "metrics": metrics, "train_cpu": cpu.result, "last_logs": last,
                         "logit_scale": float(student.model.logit_scale.detach().exp())})
            log(f"lam {lam}: {metrics} ({cpu.result['wall_s']:.1f} s, logs {last})")
    runs.sort(key=lambda r: -r["lam"])
    results.update({f"student lam={r['lam']:g}": r["metrics"] for r in runs})
    params = sum(p.numel() for p in make_student(args.seed, teacher.embed_dim).model.parameters())
    teacher_params = sum(p.numel() for p in teacher.model.parameters())
    record.update(teacher=args.teacher, weights=note, teacher_info=model_info(teacher), student_config=STUDENT,
                  student_parameters=params, teacher_parameters=teacher_params, settings=vars(args),
                  teacher_embedding_cpu=teacher_cpu.result, runs=runs, results=results,
                  sizes={"train": len(train), "test": len(test)})
    write_results("distill_cifar10", record, render(record))


if __name__ == "__main__":
    main()
