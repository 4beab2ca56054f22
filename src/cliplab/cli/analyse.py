"""``cliplab analyse sce|cab``: analyses of a model's features (SCE, paper 20; concept-association bias, paper 25)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, default_templates

SUMMARY = "Analyses of a model's features: SCE (paper 20), concept-association bias (paper 25)."
analyse_app = typer.Typer(
    name="analyse",
    help=f"{SUMMARY}\n\ncliplab methods lists them with their papers; cliplab robustness-fit is the "
    "effective-robustness analysis (paper 22).",
    short_help=SUMMARY,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

OUTPUT_DIR = typer.Option(Path("results"), "--output-dir", "-o", help="Where the JSON goes.")


@analyse_app.command("sce", short_help="Schur complement entropy of paired image/text features (paper 20).")
@command
def sce(
    pairs: str = typer.Option(..., "--pairs", help="An .npz with arrays x (the conditioning side: text, or a second "
                              "image set) and y (the images), row i of each a pair; or a dataset (named, folder or "
                              "manifest) whose images are paired with their first caption, or without captions with "
                              "one seeded template filled with their class name (embedded with --model)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file pairing a dataset without "
                                  "captions (default: the dataset's CLIP_benchmark set, else 'imagenet7')."),
    limit: int = typer.Option(2000, "--limit", min=2, help="Images of a dataset: a subset drawn with --seed."),
    kernel: str = typer.Option("gaussian", "--kernel", help="gaussian (random Fourier features, the authors' SCE "
                               "default) or cosine (feature columns' cosine similarity)."),
    sigma: float = typer.Option(3.5, "--sigma", min=1e-6, help="Gaussian kernel bandwidth (the authors' demo: 3.5)."),
    rff_dim: int = typer.Option(500, "--rff-dim", min=1, help="Random Fourier frequencies (matrices are 2x this "
                                "square; use fewer than half the pairs; the authors' demo: 2500)."),
    output_dir: Path = OUTPUT_DIR,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Schur complement entropy: the image diversity the paired texts do not explain, and the prompts' share."""
    from ..analysis.sce import KERNELS, paired_features, read_pairs_npz, sce_score, write_sce_results

    if kernel not in KERNELS:
        raise CliplabError(f"--kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    path = Path(pairs)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise CliplabError(f"--pairs {pairs}: no such file")
        x, y = read_pairs_npz(path)
        info = {"dataset": path.stem, "pairs": int(len(x)), "texts": f"x of {path}", "source": str(path)}
        shown = f"{path.name} ({len(x)} pairs)"
    else:
        dataset = data.load(pairs, None, run.hash_content)
        backbone = run.load_backbone()
        x, y, info = paired_features(backbone, dataset, templates=default_templates(templates, dataset.name),
                                     limit=limit, seed=run.seed, cache_dir=run.cache_dir, batch_size=run.batch_size,
                                     num_workers=run.workers, progress=not run.quiet)
        shown = f"{dataset.name} ({dataset.split}, {info['pairs']} pairs) · {backbone.display_name}"
    result = sce_score(x, y, kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=run.seed)
    settings = f"gaussian sigma={sigma}, {rff_dim} frequencies" if kernel == "gaussian" else "cosine kernel"
    table = Table(title=f"SCE · {shown} · {settings}")
    for column in ("SCE (not explained by x)", "prompt diversity (explained)", "unexplained share",
                   "explained share"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.sce:.3f}", f"{result.prompt_diversity:.3f}", f"{100 * result.complement_share:.1f}%",
                  f"{100 * result.explained_share:.1f}%")
    console.print(table)
    if kernel == "gaussian" and 2 * rff_dim >= result.n:
        console.print(f"note: {2 * rff_dim} features for {result.n} pairs: x's features span every pair and the "
                      "complement is near zero whatever y is; use --limit above 2x --rff-dim or a smaller --rff-dim")
    console.print(f"json: {write_sce_results(result, info, output_dir)}")


@analyse_app.command("cab", short_help="Concept-association bias on object+distractor composites (paper 25).")
@command
def cab(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Labelled images the probes are built from (named, "
                                "folder or manifest), e.g. cifar10."),
    attribute: str = typer.Option("class", "--attribute", help="class (the attribute is the class name) or colour "
                                  "(objects recoloured, colour prompts)."),
    size: float = typer.Option(0.5, "--size", min=0.0, max=0.99, help="The distractor's side as a fraction of the "
                               "object's (0: no distractor, CAB is 0)."),
    probes: int = typer.Option(500, "--probes", min=1, help="Number of seeded object+distractor probes (--seed)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Class probes: template set or file (default: the "
                                  "dataset's CLIP_benchmark set). Colour probes: templates with {c} for the colour "
                                  "(and {o} for the object's class with --name-object)."),
    name_object: bool = typer.Option(False, "--name-object", help="Colour probes: name the object's class in the "
                                     "prompts (the paper's 'the color of the lemon is ...')."),
    output_dir: Path = OUTPUT_DIR,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Concept-association bias: how often a distractor's attribute wins over the object's (paper 25)."""
    from ..analysis.cab import ATTRIBUTES, measure_cab, write_cab_results
    from ..data import has_labels

    if attribute not in ATTRIBUTES:
        raise CliplabError(f"--attribute {attribute!r}: use one of {', '.join(ATTRIBUTES)}")
    if name_object and attribute != "colour":
        raise CliplabError("--name-object is for --attribute colour")
    images = data.load(dataset, None, run.hash_content)
    if not has_labels(images):
        raise CliplabError(f"{dataset}: has no labels to build probes from")
    chosen = default_templates(templates, images.name) if attribute == "class" else templates
    backbone = run.load_backbone()
    result = measure_cab(backbone, images, attribute=attribute, size=size, probes=probes, seed=run.seed,
                         templates=chosen, name_object=name_object, cache_dir=run.cache_dir,
                         batch_size=run.batch_size, num_workers=run.workers, progress=not run.quiet)
    summary = result["summary"]
    table = Table(title=f"concept-association bias · {images.name} ({images.split}) · {backbone.display_name} · "
                  f"{attribute} attributes · distractor {size:g} of the side · {summary['probes']} probes")
    for column in ("known (object alone right)", "CAB", "object kept", "distractor wins (all)",
                   "distractor wins (object alone)"):
        table.add_column(column, justify="right")

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    table.add_row(f"{summary['known']} ({pct(summary['known_rate'])})", pct(summary["cab"]), pct(summary["kept"]),
                  pct(summary["distractor_rate"]), pct(summary["solo_distractor_rate"]))
    console.print(table)
    console.print(f"json: {write_cab_results(result, output_dir)}")
