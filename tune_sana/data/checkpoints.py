"""Checkpoints as files: one rule for "hub id or local folder", one check for a weight
variant's files, and where the demo base lives. Pure path logic; loading is training.models'
(the transformer) and data.cache's (the encoders).
"""

from __future__ import annotations

from pathlib import Path

from tune_sana.config import DEMO_BASE, UserError, home

TRANSFORMER_WEIGHTS = "diffusion_pytorch_model"  # the weight-file stem diffusers models use
# Raise it whenever what the demo base learns changes (the built-in data's pretraining part, the
# text encoder, the architecture, the pretraining recipe): the base is then rebuilt in a new
# folder rather than an old one reused. 2: the pretraining/fine-tune worlds of builtin:shapes.
DEMO_BASE_VERSION = 2


def demo_base_path() -> Path:
    """Where the demo base of this version lives: $TUNE_SANA_HOME/demo-base-v<N>."""
    return home() / f"{DEMO_BASE}-v{DEMO_BASE_VERSION}"


def demo_base_built() -> bool:
    """The demo base of this version is on disk (a file check: no torch, no diffusers)."""
    return (demo_base_path() / "config.json").is_file()


def is_local(model: str) -> bool:
    """A local folder rather than a hub id: it exists, starts with '.', '/' or '~', or has more
    than one '/' (a hub id is owner/name)."""
    return (Path(model).expanduser().exists() or model.startswith((".", "/", "~"))
            or model.count("/") > 1)


def weights_name(stem: str, variant: str | None) -> str:
    """The safetensors file of one weight variant: ``model.fp16.safetensors``."""
    return f"{stem}{'.' + variant if variant else ''}.safetensors"


def has_weights(folder: Path, variant: str | None, stem: str = TRANSFORMER_WEIGHTS) -> bool:
    """The folder holds the variant's safetensors weights, in one file or sharded (index)."""
    name = weights_name(stem, variant)
    return (folder / name).is_file() or (folder / f"{name}.index.json").is_file()


def resolve_folder(model: str) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of a transformer for ``from_pretrained``; UserError for a
    broken local folder or an unbuilt demo base."""
    if model == DEMO_BASE:
        folder = demo_base_path()
        if not (folder / "config.json").is_file():
            raise UserError(
                f"the demo base checkpoint is not built yet ({folder}); run: tune-sana make-base"
            )
        return str(folder), None
    if not is_local(model):
        return model, "transformer"  # a hub id: diffusers pipelines keep it in transformer/
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UserError(f"model '{model}': no such folder; give a diffusers Sana checkpoint folder")
    if (path / "config.json").is_file():
        return str(path), None
    if (path / "transformer" / "config.json").is_file():
        return str(path), "transformer"
    raise UserError(
        f"model '{model}': no config.json in it or in transformer/; "
        "point to a diffusers-format Sana checkpoint (save_pretrained output)"
    )
