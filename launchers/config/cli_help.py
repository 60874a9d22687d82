"""``python -m launchers.train --help``: config groups (from Hydra's listing) and every field's doc (from the models)."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from launchers.config.conf_store import GROUP_SECTIONS, is_schema_node, register_configs, section_options
from launchers.config.run_config import RunConfig

USAGE = """\
usage: python -m launchers.train [-m] [GROUP=OPTION ...] [KEY=VALUE ...]
       torchrun --nproc-per-node K -m launchers.train parallel.cp_size=C [...]
       accelerate launch --multi_gpu --num_processes K -m launchers.train backend=trl model=hf model.name_or_path=ID device=cuda [...]

Trains a policy with GRPO-family RL on the embedded digit-sum task, with the embedded toy trainer
(backend=toy, default) or Hugging Face TRL (backend=trl model=hf_tiny|hf); every setting below can be
overridden as KEY=VALUE. -m runs a sweep (e.g. -m loss=grpo,dapo,drgrpo,scalerl,gspo,cispo,sapo); every job is
validated before the first starts. dry_run=true validates and exits. Hydra's own help: --hydra-help.

examples:
  python -m launchers.train loss=drgrpo loss.divisor=40960
  python -m launchers.train backend=trl model=hf_tiny loss=scalerl
  python -m launchers.train -m loss=grpo,dapo,drgrpo,scalerl,gspo,cispo,sapo hydra/launcher=joblib
  python -m launchers.report multirun/DATE/TIME
"""


def group_options() -> dict[str, list[str]]:
    """Options of each config group, as Hydra lists them (the generated schema nodes ``base*`` hidden)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from launchers.config.preflight import CONFIG_DIR

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            loader = GlobalHydra.instance().config_loader()
            groups = {}
            for group in sorted(loader.list_groups("")):
                if group == "hydra":
                    continue
                groups[group] = [o for o in loader.get_group_options(group) if not is_schema_node(o)]
            for group in ("launcher", "sweeper"):
                groups[f"hydra/{group}"] = loader.get_group_options(f"hydra/{group}")
            return groups
    finally:
        GlobalHydra.instance().clear()


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def field_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    """``key (type, default): doc`` for every leaf field of ``model``."""
    lines = []
    for name, field in model.model_fields.items():
        if name in ("target", "kind"):  # set by Hydra / by the group option
            continue
        if not prefix and name in GROUP_SECTIONS:
            for option, member in section_options(name).items():
                lines.append(f"\n{name}={option}: {member.__doc__.splitlines()[0]}")
                lines.extend(field_lines(member, prefix=f"{name}."))
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"\n{prefix}{name}: {field.description or ''}")
            lines.extend(field_lines(annotation, prefix=f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {prefix}{name} ({_type_name(annotation)}, {default})")
        if field.description:
            lines.append(f"      {field.description}")
    return lines


def render_help() -> str:
    """The full help text."""
    groups = "\n".join(f"  {g}: {', '.join(opts)}" for g, opts in group_options().items())
    return f"{USAGE}\nconfig groups:\n{groups}\n\nsettings (section defaults; presets change some):" + "\n".join(
        field_lines(RunConfig)
    )
