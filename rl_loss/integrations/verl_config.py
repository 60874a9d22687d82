"""``rl-loss-validate --verl FILE``: check the rl-loss section of a verl trainer config (e.g. ppo_trainer.yaml).

Pure YAML reading (PyYAML's safe loader, no tags, no resolvers): verl is not imported, nor anything a
``_target_`` in the file names. Values written as interpolations (``${...}``) are not resolved: the
fields they set are checked when verl builds its config (:class:`~rl_loss.integrations.verl.RLLossPolicyLossConfig`).
What is checked, one line per problem (``FILE:LINE: FIELD: what is wrong (got VALUE); fix``):

- ``actor_rollout_ref.actor.policy_loss`` exists, selects ``loss_mode: rl_loss`` and, when it has an
  ``rl_loss`` section, the ``_target_`` that accepts it (verl's own PolicyLossConfig refuses the key);
- the section's fields (:func:`~rl_loss.integrations.verl_scales.section_problems`) and verl's clip /
  SAPO settings that rl-loss takes over (:func:`~rl_loss.integrations.verl_scales.loss_config`);
- prompt_mean / trajectory_mean: one optimizer step per rollout (``ppo_mini_batch_size`` equal to
  ``data.train_batch_size``), or a prompt group could be averaged over two steps.

See ``docs/integrations/verl.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rl_loss.integrations.verl_scales import LOSS_MODE, SECTION, STEP_MODES, loss_config, section_problems

POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
ACTOR = "actor_rollout_ref.actor"
CONFIG_TARGET = "rl_loss.integrations.verl.RLLossPolicyLossConfig"
MAX_BYTES = 4 * 1024 * 1024
"""A verl trainer config is a few tens of KB; larger input is refused rather than parsed."""
ACTOR_FIELDS = ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "tau_pos", "tau_neg")


def read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The file's data (safe loader) and the line of every dotted key path.

    Raises:
        ValueError: one line naming the file for a missing, unreadable, oversized or unparsable file.
    """
    import yaml

    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path}: larger than {MAX_BYTES} bytes; give a verl trainer config (a YAML file)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the path of a verl trainer config (YAML)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({err}); give a verl trainer config (YAML)") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: YAML syntax error: {getattr(err, 'problem', None) or err}; fix the YAML") from None
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return data, lines


def _key_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path = f"{prefix}{key.value}"
                lines.setdefault(path, key.start_mark.line + 1)
                _key_lines(value, path + ".", lines)


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _interpolated(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _resolve(data: Any, value: Any) -> Any:
    """A value that is exactly ``${a.b.c}`` naming a key of the file: that key's value (no resolvers)."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}") and ":" not in value:
        found = _get(data, value[2:-1].strip())
        if found is not None and not isinstance(found, dict | list) and not _interpolated(found):
            return found
    return value


def verl_config_problems(path: Path) -> tuple[list[str], list[str], str]:
    """(problem lines, warning lines, summary) of a verl trainer config's rl-loss section (valid: no problems)."""
    try:
        data, lines = read_yaml(path)
    except ValueError as err:
        return [str(err)], [], ""

    def at(field: str) -> str:
        line = lines.get(field) or lines.get(field.rsplit(".", 1)[0])
        return f"{path}:{line}" if line else str(path)

    policy_loss = _get(data, POLICY_LOSS)
    if not isinstance(policy_loss, dict):
        return [f"{path}: {POLICY_LOSS}: missing (got {policy_loss!r}); add it with loss_mode: rl_loss "
                "(see docs/integrations/verl.md)"], [], ""
    section = policy_loss.get("rl_loss")
    problems = []
    if policy_loss.get("loss_mode") != LOSS_MODE:
        problems.append(f"{at(POLICY_LOSS + '.loss_mode')}: {POLICY_LOSS}.loss_mode: rl-loss is not selected "
                        f"(got {policy_loss.get('loss_mode')!r}); set loss_mode: rl_loss")
    if section is not None and policy_loss.get("_target_") != CONFIG_TARGET:
        problems.append(f"{at(POLICY_LOSS + '._target_')}: {POLICY_LOSS}._target_: verl's own config refuses the "
                        f"rl_loss section (got {policy_loss.get('_target_')!r}); set _target_: {CONFIG_TARGET}")
    if section is not None and not isinstance(section, dict):
        return [*problems, f"{at(SECTION)}: {SECTION}: must be a mapping of rl-loss fields (got {section!r}); "
                "write e.g. aggregation: token_mean"], [], ""
    section = {k: _resolve(data, v) for k, v in (section or {}).items()}
    unresolved = [k for k, v in section.items() if _interpolated(v)]
    warnings = [f"{at(f'{SECTION}.{k}')}: {SECTION}.{k}: {section[k]!r} is not resolved here (only references to "
                "keys of this file are); verl checks it when it builds its config" for k in unresolved]
    section = {k: v for k, v in section.items() if k not in unresolved}
    section_lines = [ln for ln in section_problems(section) if ln.split(":", 1)[0] not in
                     {f"{SECTION}.{k}" for k in unresolved}]  # a rule about a field we could not read
    problems += [f"{at(line.split(':', 1)[0])}: {line}" for line in section_lines]
    if problems:
        return problems, warnings, ""
    actor = _get(data, ACTOR) or {}
    known = {k: _resolve(data, actor.get(k)) for k in ACTOR_FIELDS if k in actor}
    known = {k: v for k, v in known.items() if not _interpolated(v)}
    defaults = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0,
                "tau_pos": 1.0, "tau_neg": 1.05}  # verl 0.9.1's ActorConfig defaults
    skipped = {f"{SECTION}.{k}" for k in unresolved}
    try:
        config = loss_config(section, {**defaults, **known})
        fields = config.model_dump()
    except ValueError as err:  # a rule about a field we could not read is left to verl
        kept = [ln for ln in str(err).splitlines() if ln.split(":", 1)[0] not in skipped]
        problems += [f"{at(line.split(':', 1)[0])}: {line}" for line in kept]
        fields = {"aggregation": "sample_mean", "surrogate": "ppo_clip", "divisor": None, **section}
    problems += _one_step_per_rollout(data, fields["aggregation"], at)
    if problems:
        return problems, warnings, ""
    divisor = f", divisor={fields['divisor']:g}" if fields["divisor"] is not None else ""
    summary = f"verl loss_mode=rl_loss, aggregation={fields['aggregation']}{divisor}, surrogate={fields['surrogate']}"
    return problems, warnings, summary


def _one_step_per_rollout(data: Any, aggregation: str, at: Any) -> list[str]:
    if aggregation not in STEP_MODES:
        return []
    mini, rollout = _get(data, ACTOR + ".ppo_mini_batch_size"), _get(data, "data.train_batch_size")
    if isinstance(mini, int) and isinstance(rollout, int) and mini != rollout:
        return [
            f"{at(ACTOR + '.ppo_mini_batch_size')}: {ACTOR}.ppo_mini_batch_size: aggregation={aggregation} needs one "
            f"optimizer step per rollout, or a {'prompt group' if aggregation == 'prompt_mean' else 'trajectory'} "
            f"could be averaged over two steps (got {mini} with data.train_batch_size={rollout}); "
            f"set ppo_mini_batch_size: {rollout}"
        ]
    return []
