"""CLIP-MoE's Diversified Multiplet Upcycling (paper 46): fine-tuned MLP copies as experts, then routing.

``multiplet_upcycle(model, images, tokens, experts=E)``:

1. copy 0 is ``model`` itself (its MLPs are the first expert);
2. for k = 1 .. E-1: the pairs copy k-1 finds hard (the ``hard_fraction`` with the largest per-pair symmetric
   InfoNCE over the pool, ``pair_losses``) are clustered by k-means on copy k-1's joint image+text features
   (``clusters`` groups; cosine k-means of ``objectives_mlcd``); copy k starts from copy k-1 and fine-tunes only its
   block MLPs (both towers) with the ``clip`` loss on batches drawn within one cluster at a time (the paper's
   cluster-conditioned contrastive stages: negatives from the same cluster are the hard ones);
3. the copies' MLPs become the experts of top-``top_k`` routed MoE layers (``objectives_moe.upcycle``), and, with
   ``routing_steps``, the routers alone train on all pairs with ``clip-moe`` (``routers_only``).

Departures: the paper's multistage contrastive learning accumulates cluster labels over stages on a large corpus and
fine-tunes each stage far longer; here each stage reclusters the hard pairs of the stage before, on an in-memory
pool, for a few steps.

``upcycle_folder(UpcycleConfig(...), folder)`` (``cliplab moe-upcycle``) runs it on a seeded pool of a pretraining
source's pairs and writes a model folder that ``load_model`` reads (an open_clip folder whose config records the MoE
layers, ``models/moe.py``); each finished copy is kept in ``train_state/`` so a killed run resumes at the next copy
(and the routing stage from its checkpoint). ``cliplab pretrain --loss clip-moe --init-model FOLDER`` trains the
upcycled model on (all weights, or ``--loss-param routers_only=true``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import TrainSettings, get_objective, run_training
from .objectives_mlcd import spherical_kmeans
from .objectives_moe import _blocks, upcycle


@dataclass(frozen=True)
class MultipletStage:
    """What made copy ``k``: the pool indices copy k-1 found hard and their cluster labels (same order)."""

    k: int
    hard: tuple[int, ...]
    clusters: tuple[int, ...]


@torch.no_grad()
def pair_losses(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE over the pool: ``(CE(row i of s I T^T, i) + CE(column i, i)) / 2``, (n,)."""
    model.eval()
    img = F.normalize(model.encode_image(images).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    logits = model.logit_scale.exp().float() * img @ txt.T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def hard_clusters(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, hard_fraction: float,
                  clusters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the hardest ``hard_fraction`` of the pairs under ``model``, sorted; their k-means cluster labels on
    the concatenated unit image and text features)."""
    losses = pair_losses(model, images, tokens)
    count = max(clusters, int(round(hard_fraction * len(losses))))
    hard = torch.sort(losses.topk(min(count, len(losses))).indices).values
    with torch.no_grad():
        joint = torch.cat([F.normalize(model.encode_image(images[hard]).float(), dim=-1),
                           F.normalize(model.encode_text(tokens[hard]).float(), dim=-1)], dim=1)
    centres = spherical_kmeans(joint, clusters, seed=seed)
    return hard, (F.normalize(joint, dim=-1) @ centres.T).argmax(1)


def _mlp_only(model: torch.nn.Module) -> torch.nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for block in _blocks(model):
        for param in block.mlp.parameters():
            param.requires_grad_(True)
    return model


def multiplet_upcycle(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, experts: int = 4,
                      top_k: int = 2, hard_fraction: float = 0.5, clusters: int = 2, steps: int = 20,
                      batch_size: int = 16, lr: float = 1e-4, routing_steps: int = 0, balance: float = 0.01,
                      seed: int = 0, device: str | None = "cpu", *, done_copies: Sequence[torch.nn.Module] = (),
                      on_copy: Callable[[int, torch.nn.Module], None] | None = None,
                      routing_dir: str | Path | None = None) -> tuple[torch.nn.Module, list[MultipletStage]]:
    """An upcycled copy of the open_clip ``model`` (never changed) and the stages that made its experts (module
    docstring); ``images`` (n, 3, H, W) and ``tokens`` (n, L) are the pool of pairs.

    Resuming: ``done_copies`` are copies 1.. already made (their stages are recomputed, they are not retrained);
    ``on_copy(k, copy)`` is told each new copy; ``routing_dir`` checkpoints the routing stage (the engine resumes it).
    """
    if experts < 1 or not 0 < hard_fraction <= 1 or clusters < 1 or steps < 1 or len(images) != len(tokens):
        raise CliplabError("multiplet upcycling: need experts >= 1, 0 < hard_fraction <= 1, clusters >= 1, "
                           "steps >= 1 and as many images as captions")
    if len(done_copies) >= experts:
        raise CliplabError(f"multiplet upcycling: {len(done_copies)} copies done for {experts} experts")
    copies, stages = [model], []
    for k in range(1, experts):
        previous = copies[-1]
        hard, labels = hard_clusters(previous, images, tokens, hard_fraction, clusters, seed + k)
        stages.append(MultipletStage(k, tuple(hard.tolist()), tuple(labels.tolist())))
        if k <= len(done_copies):
            copies.append(done_copies[k - 1])
            continue
        groups = [hard[labels == c] for c in range(clusters) if (labels == c).sum() >= 2]
        if not groups:
            raise CliplabError(f"multiplet upcycling: copy {k} has no cluster of two or more hard pairs")

        def data(epoch: int, start: int = 0, groups=groups, k=k):
            gen = torch.Generator().manual_seed(seed * 1000 + k * 100 + epoch)
            for step in range(start, steps):
                group = groups[step % len(groups)]
                pick = group[torch.randperm(len(group), generator=gen)[:batch_size]]
                yield {"images": images[pick], "tokens": tokens[pick]}

        current = _mlp_only(copy.deepcopy(previous))
        settings = TrainSettings(steps=steps, lr=lr, seed=seed + k, device=device, progress=False,
                                 desc=f"multiplet copy {k}")
        run_training(current, get_objective("clip"), data, settings)
        copies.append(current.cpu())
        if on_copy is not None:
            on_copy(k, current)
    moe = upcycle(model, top_k=top_k, expert_models=copies)
    if routing_steps:
        def routing(epoch: int, start: int = 0):
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            for _ in range(start, routing_steps):
                pick = torch.randperm(len(images), generator=gen)[:batch_size]
                yield {"images": images[pick], "tokens": tokens[pick]}

        settings = TrainSettings(steps=routing_steps, lr=lr, seed=seed, device=device, progress=False,
                                 desc="moe routing", checkpoint_dir=routing_dir,
                                 checkpoint_every=max(1, routing_steps // 4))
        run_training(moe, get_objective("clip-moe", balance=balance, routers_only=True), routing, settings)
        moe.cpu()
    return moe, stages


@dataclass(frozen=True)
class UpcycleConfig:
    """What ``cliplab moe-upcycle`` does: the start model, the pool of pairs and the multiplet settings.

    ``pool`` pairs are drawn once (seeded, no augmentation) from ``source``'s ``split``; ``steps`` is each copy's
    fine-tuning steps, ``routing_steps`` the routers' training after assembly (0: routers stay at zero, uniform).
    """

    source: str
    init_model: str
    split: str = "train"
    templates: str = "generic"
    experts: int = 4
    top_k: int = 2
    hard_fraction: float = 0.5
    clusters: int = 2
    steps: int = 20
    routing_steps: int = 20
    pool: int = 512
    batch_size: int = 32
    lr: float = 1e-4
    balance: float = 0.01
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self):
        if self.experts < 2 or self.pool < 2 or self.batch_size < 2 or self.routing_steps < 0 or self.lr <= 0:
            raise CliplabError("moe-upcycle: need --experts >= 2, --pool >= 2, --batch-size >= 2, --routing-steps "
                               ">= 0 and --lr > 0")


@dataclass
class UpcycleResult:
    """The folder written, the upcycled model, its stages and what the run cost."""

    folder: Path
    model: torch.nn.Module
    stages: list[MultipletStage]
    pool: int
    resumed_copies: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def draw_pool(stream, count: int, seed: int, tokenize) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) of ``count`` pairs of a ``PairStream`` (all when it has fewer): its first batch of a seeded
    epoch, full-size crops, no flips; each image with the one caption drawn for it."""
    count = min(int(count), len(stream))
    batch = next(iter(stream.batches(0, seed=seed, batch_size=count, tokenize=tokenize, crop_scale=1.0,
                                     flip=False)))
    return batch["images"].contiguous(), batch["tokens"][batch["text_index"]]


STATE = "train_state"


def upcycle_folder(config: UpcycleConfig, folder: str | Path, progress: bool = True, *, init=None) -> UpcycleResult:
    """Multiplet-upcycle ``config.init_model`` (or the Backbone ``init``) on a pool of ``config.source`` pairs and
    write a model folder ``load_model`` reads; a folder holding an unfinished run of the same config resumes it."""
    import time

    from ..models import load_model
    from ..models.backbone import Backbone
    from .loop import _preprocess, _source_splits, backbone_model_config, training_lock
    from .pairs import open_stream

    folder = Path(folder)
    start = time.perf_counter()
    with training_lock(folder):
        backbone: Backbone = init if init is not None else load_model(config.init_model, device="cpu")
        model_cfg = backbone_model_config(backbone)
        state = folder / STATE
        identity = {"config": asdict(config) | {"data_root": None}, "init_model_id": backbone.model_id}
        saved = state / "upcycle.json"
        if saved.is_file() and json.loads(saved.read_text()) != identity:
            raise CliplabError(f"{folder}: holds an upcycling run with other options or another start model; use "
                               "the same options or another --output")
        state.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        size, mean, std = _preprocess(backbone, model_cfg)
        split = config.split if _source_splits(config.source) else None
        stream = open_stream(config.source, split, size, config.templates, config.data_root, progress, mean=mean,
                             std=std)
        images, tokens = draw_pool(stream, config.pool, config.seed, backbone.tokenize)
        dense = backbone.model.cpu().eval()
        done = []
        for k in range(1, config.experts):
            path = state / f"copy_{k}.safetensors"
            if not path.is_file():
                break
            done.append(_load_copy(dense, path))

        def keep(k: int, module: torch.nn.Module) -> None:
            from safetensors.torch import save_file

            mlp = {n: t.detach().contiguous() for n, t in module.state_dict().items() if ".mlp." in n}
            save_file(mlp, str(state / f"copy_{k}.tmp.safetensors"))
            (state / f"copy_{k}.tmp.safetensors").replace(state / f"copy_{k}.safetensors")

        moe, stages = multiplet_upcycle(dense, images, tokens, experts=config.experts, top_k=config.top_k,
                                        hard_fraction=config.hard_fraction, clusters=config.clusters,
                                        steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                                        routing_steps=config.routing_steps, balance=config.balance, seed=config.seed,
                                        done_copies=done, on_copy=keep, routing_dir=state / "routing")
        _write(folder, moe.eval(), model_cfg, size, mean, std, config, backbone, stages, len(images), len(done))
        notes = [f"resumed with {len(done)} of {config.experts - 1} fine-tuned copies already made"] if done else []
    return UpcycleResult(folder, moe, stages, len(images), len(done), time.perf_counter() - start, notes)


def _load_copy(dense: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    copy_k = copy.deepcopy(dense)
    missing = copy_k.load_state_dict(load_file(str(path)), strict=False)
    if missing.unexpected_keys:
        raise CliplabError(f"{path}: not a copy of this model's MLPs (e.g. {missing.unexpected_keys[0]})")
    return copy_k


def _write(folder: Path, moe: torch.nn.Module, model_cfg: dict, size: int, mean, std, config: UpcycleConfig,
           backbone, stages: list[MultipletStage], pool: int, resumed: int) -> None:
    from safetensors.torch import save

    from ..fileio import atomic_write, atomic_write_text
    from ..models.moe import MOE_KEY, moe_spec
    from .export import CARD_JSON, CARD_MD, open_clip_config
    from .loop import WEIGHTS

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in moe.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda handle: handle.write(save(tensors)))
    cfg = open_clip_config(model_cfg, size, mean, std)
    cfg[MOE_KEY] = moe_spec(moe)
    atomic_write_text(folder / "open_clip_config.json", json.dumps(cfg, indent=2) + "\n")
    sizes = [{"copy": s.k, "hard_pairs": len(s.hard),
              "cluster_sizes": [s.clusters.count(c) for c in range(config.clusters)]} for s in stages]
    card = {"model": f"{backbone.info.name} upcycled (CLIP-MoE multiplet)", "moe": moe_spec(moe),
            "init_model": {"spec": config.init_model, "model_id": backbone.model_id},
            "upcycle": asdict(config), "pool_pairs": pool, "stages": sizes, "resumed_copies": resumed,
            "weights_note": "upcycled by cliplab moe-upcycle from the model above; not a general-purpose CLIP"}
    atomic_write_text(folder / CARD_JSON, json.dumps(card, indent=2) + "\n")
    lines = [f"# {card['model']}", "", f"- from: {config.init_model}", f"- MoE: {card['moe']['experts']} experts, "
             f"top-{card['moe']['top_k']} routing in every transformer block MLP",
             f"- pool: {pool} pairs of {config.source} ({config.split}); each copy {config.steps} steps, routing "
             f"{config.routing_steps} steps", *[f"- copy {s['copy']}: {s['hard_pairs']} hard pairs, clusters "
                                                f"{s['cluster_sizes']}" for s in sizes], "",
             "Load it with `cliplab.load_model(PATH)` or `--model PATH`; train it on with `cliplab pretrain SOURCE "
             "--init-model PATH --loss clip-moe`."]
    atomic_write_text(folder / CARD_MD, "\n".join(lines) + "\n")
