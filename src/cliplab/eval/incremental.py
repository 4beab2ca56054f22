"""Class-incremental few-shot protocol (issue 25, CPE-CLIP): sessions of new classes, accuracy on every class seen so
far after each session, and forgetting.

- ``split_sessions(n_classes, sessions)``: the classes in index order cut into ``sessions`` consecutive groups
  (sizes differ by at most one, the larger first); ``check_sessions`` refuses overlapping, empty or unknown classes in
  one line.
- ``draw_shots(labels, classes, shots, seed)``: ``shots`` training items per class, seeded per class.
- ``accuracy_table``: ``acc[t][j]`` = accuracy after session t on the test items of session j's classes (j <= t),
  each prediction the arg-max over every class seen by session t; ``forgetting(acc)`` after session t >= 1 is the mean
  over earlier sessions j of ``max_{j <= l < t} acc[l][j] - acc[t][j]`` (Chaudhry et al.'s forgetting), 0 after the
  first session.
- ``run_incremental``: trains any registered method session by session and evaluates after each. The protocol knows
  no method by name (``incremental_methods``): a head whose class has ``learn_session`` (a session learner, e.g.
  CPE-CLIP) is built once over every class and given each session's shots in turn; any other encoder-family head is
  the naive baseline (:class:`NaiveRefit`): a fresh head over the classes seen so far, fitted on that session's shots
  only. A method whose fit needs what the protocol cannot give (a second model, an LLM, an artefact, unlabelled rows,
  captions) is refused in one line. With ``output_dir`` each finished session's head is saved (a rerun resumes after
  the last one) and the training loop's checkpoints go to ``output_dir/checkpoints``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CliplabError

RESULT_FILE = "incremental.json"


def split_sessions(n_classes: int, sessions: int) -> list[list[int]]:
    """Classes 0..n-1 in order cut into ``sessions`` consecutive groups (the larger groups first)."""
    if sessions < 1 or sessions > n_classes:
        raise CliplabError(f"--sessions {sessions}: give 1 to {n_classes} sessions for {n_classes} classes")
    sizes = [n_classes // sessions + (1 if s < n_classes % sessions else 0) for s in range(sessions)]
    starts = np.cumsum([0, *sizes])
    return [list(range(int(starts[s]), int(starts[s + 1]))) for s in range(sessions)]


def check_sessions(sessions: Sequence[Sequence[int]], n_classes: int) -> list[list[int]]:
    """The sessions as lists of ints; one line for an empty session, an unknown class or a class in two sessions."""
    seen: dict[int, int] = {}
    out = []
    for s, classes in enumerate(sessions):
        classes = [int(c) for c in classes]
        if not classes:
            raise CliplabError(f"session {s + 1} has no classes")
        for c in classes:
            if not 0 <= c < n_classes:
                raise CliplabError(f"session {s + 1}: class {c} is not among the {n_classes} classes")
            if c in seen:
                raise CliplabError(f"sessions {seen[c] + 1} and {s + 1} both hold class {c}: sessions must not "
                                   "overlap")
            seen[c] = s
        out.append(classes)
    return out


def parse_sessions(text: str, n_classes: int) -> list[list[int]]:
    """``"0,1;2,3;4"`` -> [[0, 1], [2, 3], [4]] (checked)."""
    try:
        sessions = [[int(c) for c in part.split(",") if c.strip()] for part in text.split(";")]
    except ValueError:
        raise CliplabError(f"--session-classes {text!r}: write class indices, sessions separated by ';' "
                           "(e.g. 0,1;2,3)") from None
    return check_sessions(sessions, n_classes)


def draw_shots(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int) -> np.ndarray:
    """``shots`` item indices per class of ``classes`` (seeded by (seed, class)); one line if a class has fewer."""
    labels = np.asarray(labels)
    out = []
    for c in classes:
        items = np.flatnonzero(labels == c)
        if len(items) < shots:
            raise CliplabError(f"class {c} has {len(items)} training items, fewer than --shots {shots}")
        out.append(np.sort(np.random.default_rng([int(seed), int(c)]).choice(items, shots, replace=False)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def draw_test(labels: np.ndarray, classes: Sequence[int], per_class: int | None, seed: int) -> np.ndarray:
    """Test items of ``classes``: all of them, or ``per_class`` of each (seeded)."""
    labels = np.asarray(labels)
    out = []
    for c in classes:
        items = np.flatnonzero(labels == c)
        if per_class is not None and len(items) > per_class:
            items = np.sort(np.random.default_rng([int(seed), 7, int(c)]).choice(items, per_class, replace=False))
        out.append(items)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def session_accuracies(logits: np.ndarray, labels: np.ndarray, sessions: Sequence[Sequence[int]]) -> list[float]:
    """Accuracy per session's classes, each prediction the arg-max over the classes of ``sessions`` (all seen)."""
    seen = np.asarray([c for s in sessions for c in s])
    predicted = seen[np.argmax(np.asarray(logits)[:, seen], axis=1)]
    out = []
    for classes in sessions:
        rows = np.isin(labels, classes)
        out.append(float(np.mean(predicted[rows] == labels[rows])) if rows.any() else float("nan"))
    return out


def seen_accuracy(logits: np.ndarray, labels: np.ndarray, sessions: Sequence[Sequence[int]]) -> float:
    """Accuracy on the test items of every seen class, the arg-max over the seen classes."""
    seen = np.asarray([c for s in sessions for c in s])
    rows = np.isin(labels, seen)
    predicted = seen[np.argmax(np.asarray(logits)[rows][:, seen], axis=1)]
    return float(np.mean(predicted == labels[rows])) if rows.any() else float("nan")


def forgetting(acc: Sequence[Sequence[float]]) -> list[float]:
    """Forgetting after each session from ``acc[t][j]`` (j <= t): 0 after the first, then the mean over j < t of
    ``max_{j <= l < t} acc[l][j] - acc[t][j]``."""
    out = []
    for t in range(len(acc)):
        if t == 0:
            out.append(0.0)
            continue
        drops = [max(acc[k][j] for k in range(j, t)) - acc[t][j] for j in range(t)]
        out.append(float(np.mean(drops)))
    return out


@dataclass
class IncrementalResult:
    """What :func:`run_incremental` measured: per session its classes, the accuracy on every seen class, the
    per-session accuracies ``acc`` and the forgetting."""

    method: str
    sessions: list[list[int]]
    class_names: list[str]
    shots: int
    seed: int
    model: str
    accuracy: list[float] = field(default_factory=list)
    acc: list[list[float]] = field(default_factory=list)
    forgetting: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    dataset: str = ""
    test_items: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _encode(backbone, dataset, indices: np.ndarray, batch_size: int = 128) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        pixels = torch.stack([backbone.preprocess(dataset.load_image(int(i)).convert("RGB")) for i in rows])
        out.append(backbone.encode_images(pixels).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.embed_dim), np.float32)


class _Rows:
    """A dataset view of the rows ``indices`` (``load_image``, ``item_id``, ``len``)."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, i: int):
        return self.dataset.load_image(int(self.indices[i]))

    def item_id(self, i: int) -> str:
        return self.dataset.item_id(int(self.indices[i]))


#: Fit inputs the protocol cannot give a method (it gives the session's features, labels and, to a method that
#: declares "images", the session's images; "val" and "views" are optional inputs it leaves out).
UNSUPPORTED_NEEDS = ("aux_features", "caption_features", "llm", "artefact", "unlabelled")


def session_learner(cls) -> bool:
    """Whether a head class learns session by session (has ``learn_session(X, y, ...)``)."""
    return callable(getattr(cls, "learn_session", None))


def incremental_methods() -> list[str]:
    """The registered methods the protocol runs: session learners and the encoder family (refit per session), less
    those needing an input it cannot give (``UNSUPPORTED_NEEDS``)."""
    from ..heads.registry import list_heads

    return [e.name for e in list_heads() if (session_learner(e.cls) or e.family == "encoder")
            and not set(e.needs) & set(UNSUPPORTED_NEEDS)]


def check_method(method: str):
    """The registry entry of ``method``, or one line saying why the protocol cannot run it."""
    from ..heads.registry import head_entry

    entry = head_entry(method)
    if not session_learner(entry.cls) and entry.family != "encoder":
        raise CliplabError(f"incremental method {method!r}: neither a session learner (learn_session) nor an "
                           f"encoder-family method; choose one of {', '.join(incremental_methods())}")
    missing = sorted(set(entry.needs) & set(UNSUPPORTED_NEEDS))
    if missing:
        raise CliplabError(f"incremental method {method!r} needs {', '.join(missing)}, which the incremental "
                           f"protocol does not give; choose one of {', '.join(incremental_methods())}")
    return entry


def _takes(entry, name: str) -> bool:
    return name in inspect.signature(entry.cls.__init__).parameters


class NaiveRefit:
    """The naive baseline for any encoder head without ``learn_session``: at each session a fresh head over every
    class seen so far, fitted on that session's shots only (cross-entropy over every seen class where the method
    trains so; no replay, masking or balance). ``logits`` are (n, all classes), -inf for classes not seen yet."""

    def __init__(self, entry, backbone, class_names: Sequence[str], params: dict, progress: bool = False):
        self.entry, self.backbone, self.class_names = entry, backbone, list(class_names)
        self.params, self.progress = dict(params), bool(progress)
        self.head_ = None
        self.session_classes_: list[list[int]] = []

    @property
    def seen(self) -> list[int]:
        return [c for s in self.session_classes_ for c in s]

    def learn_session(self, X: np.ndarray, y: np.ndarray, images=None, checkpoint_dir=None) -> NaiveRefit:
        from ..heads import create_head

        new = sorted({int(c) for c in y})
        seen = self.seen + new
        where = {c: i for i, c in enumerate(seen)}
        params = dict(self.params)
        if _takes(self.entry, "progress"):
            params["progress"] = self.progress
        if checkpoint_dir is not None and _takes(self.entry, "checkpoint_dir"):
            params["checkpoint_dir"] = str(checkpoint_dir)
        head = create_head(self.entry.name, backbone=self.backbone if self.entry.needs_backbone else None,
                           class_names=[self.class_names[c] for c in seen], **params)
        extra = {"images": images} if "images" in self.entry.needs else {}
        head.fit(np.asarray(X, dtype=np.float32), np.asarray([where[int(c)] for c in y], dtype=np.int64), **extra)
        self.head_ = head
        self.session_classes_.append(new)
        return self

    @property
    def backbone_(self):
        return getattr(self.head_, "backbone_", None)

    def logits(self, X: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.head_.logits(X), dtype=np.float64)
        out = np.full((len(scores), len(self.class_names)), -np.inf)
        out[:, self.seen] = scores
        return out


def _image_source(model, backbone, test_data, test_rows: np.ndarray):
    """The Backbone the head scores test images through: its ``backbone_`` where it gives one whose image features
    differ from the base model's on a probe of 4 test images (else the base model: its features are reused)."""
    source = getattr(model, "backbone_", None)
    if source is None or source is backbone:
        return backbone
    probe = test_rows[:4]
    if np.allclose(_encode(source, test_data, probe), _encode(backbone, test_data, probe), atol=1e-6, rtol=0):
        return backbone
    return source


def run_incremental(backbone, train_data, test_data, sessions: Sequence[Sequence[int]], shots: int, *,
                    method: str = "cpe-clip", params: dict | None = None, seed: int = 0,
                    test_per_class: int | None = None, output_dir: str | Path | None = None,
                    progress: bool = False, report=None) -> IncrementalResult:
    """Train ``method`` on ``shots`` images per class of each session in turn and score every seen class after each
    (see the module docstring); ``report(t, result)`` is called after each session."""
    entry = check_method(method)
    method = entry.name
    learner = session_learner(entry.cls)
    names = list(train_data.class_names)
    sessions = check_sessions(sessions, len(names))
    params = dict(params or {})
    for reserved in ("checkpoint_dir", "progress", "cache_dir", "class_names", "backbone"):
        if reserved in params:
            raise CliplabError(f"parameter {reserved}: set by the incremental protocol itself")
    result = IncrementalResult(method=method, sessions=sessions, class_names=names, shots=int(shots), seed=int(seed),
                               model=getattr(backbone, "display_name", backbone.info.name), params=params,
                               dataset=getattr(train_data, "name", ""))
    test_rows = draw_test(test_data.labels, [c for s in sessions for c in s], test_per_class, seed)
    test_labels = np.asarray(test_data.labels)[test_rows]
    result.test_items = int(len(test_rows))
    out = Path(output_dir) if output_dir is not None else None
    done = _resume(out, result) if out is not None else 0
    if learner:
        from ..heads import create_head

        extra = {"progress": progress} if _takes(entry, "progress") else {}
        model = create_head(method, backbone=backbone if entry.needs_backbone else None, class_names=names,
                            **extra, **params)
        if done:
            from ..heads.saving import load_head

            model = load_head(out / f"session-{done}", backbone, method=method)
            if extra:
                model.set_params(**extra)
    else:
        model = NaiveRefit(entry, backbone, names, params, progress)
        model.session_classes_ = [list(s) for s in sessions[:done]]  # a refit needs nothing else from them
    base_test = None
    for t in range(done, len(sessions)):
        rows = draw_shots(train_data.labels, sessions[t], shots, seed)
        X = _encode(backbone, train_data, rows)
        y = np.asarray(train_data.labels)[rows].astype(np.int64)
        images = _Rows(train_data, rows)
        checkpoints = None if out is None else out / "checkpoints"
        if learner:
            if checkpoints is not None and _takes(entry, "checkpoint_dir"):
                model.set_params(checkpoint_dir=str(checkpoints))
            model.learn_session(X, y, **({"images": images} if "images" in entry.needs else {}))
        else:
            model.learn_session(X, y, images=images,
                                checkpoint_dir=None if checkpoints is None else checkpoints / f"session-{t + 1}")
        source = _image_source(model, backbone, test_data, test_rows)
        if source is backbone:
            base_test = _encode(backbone, test_data, test_rows) if base_test is None else base_test
            X_test = base_test
        else:
            X_test = _encode(source, test_data, test_rows)
        logits = model.logits(X_test)
        seen = sessions[:t + 1]
        result.acc.append(session_accuracies(logits, test_labels, seen))
        result.accuracy.append(seen_accuracy(logits, test_labels, seen))
        result.forgetting = forgetting(result.acc)
        if out is not None:
            _save_session(out, t + 1, model.head_ if isinstance(model, NaiveRefit) else model, backbone, result)
        if report is not None:
            report(t, result)
    return result


def _save_session(out: Path, number: int, head, backbone, result: IncrementalResult) -> None:
    from ..fileio import atomic_write_text
    from ..heads.saving import save_head

    folder = out / f"session-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    save_head(head, folder, model_id=backbone.model_id, model=getattr(backbone, "display_name", None))
    atomic_write_text(out / RESULT_FILE, json.dumps(result.to_json(), indent=1))


RUN_KEYS = ("method", "sessions", "class_names", "shots", "seed", "model", "params", "dataset", "test_items")


def _resume(out: Path, result: IncrementalResult) -> int:
    """Sessions already finished in ``out`` by the same run (their results copied into ``result``); a folder of
    another run is refused in one line."""
    path = out / RESULT_FILE
    if not path.is_file():
        return 0
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: unreadable ({exc}); give another -o folder") from None
    mine = json.loads(json.dumps(result.to_json()))
    for key in RUN_KEYS:
        if saved.get(key) != mine.get(key):
            raise CliplabError(f"{out}: holds an incremental run with {key} {saved.get(key)!r}, not "
                               f"{mine.get(key)!r}; use the same options to resume it, or another -o folder")
    done = len(saved.get("accuracy", []))
    while done and not (out / f"session-{done}").is_dir():
        done -= 1
    result.accuracy = list(saved["accuracy"][:done])
    result.acc = [list(a) for a in saved["acc"][:done]]
    result.forgetting = forgetting(result.acc)
    return done


def plot_incremental(results: Sequence[IncrementalResult], path: str | Path, title: str) -> Path:
    """Accuracy on the seen classes and forgetting after each session, one line per run."""
    from .plots import _save, plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for r in results:
        x = np.arange(1, len(r.accuracy) + 1)
        left.plot(x, 100 * np.asarray(r.accuracy), marker="o", label=r.method)
        right.plot(x, 100 * np.asarray(r.forgetting), marker="o", label=r.method)
    left.set_xlabel("session")
    left.set_ylabel("accuracy on seen classes (%)")
    right.set_xlabel("session")
    right.set_ylabel("forgetting (%)")
    left.legend()
    fig.suptitle(title)
    return _save(fig, Path(path))
