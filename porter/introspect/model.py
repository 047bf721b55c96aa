"""``introspect``: a normalized, weight-free view of a transformers model.

The module tree comes from building the model on torch's ``meta`` device (no memory, no
weights). Parameter shapes come from safetensors headers for a checkpoint folder (no tensor is
read), or from the meta model for a bare ``model_type``. Code shipped in a checkpoint is never
executed unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from porter.errors import ModelError

from .ancestry import ancestry_of
from .hparams import HParams, hparams_from_config

__all__ = ["ModelInfo", "introspect", "introspect_config", "known_model_types"]

MODEL_TYPE_PREFIX = "model_type:"


@dataclass
class ModelInfo:
    """What porter knows about a model before touching a weight.

    ``parameters`` are named as the checkpoint names them (safetensors keys). transformers 5
    may rename or fuse tensors when it loads a checkpoint (MoE experts become one
    ``experts.gate_up_proj`` tensor, for example); the names inside the module tree are in
    ``runtime_parameters``.
    """

    source: str
    model_type: str
    architectures: list[str]
    config: dict
    hparams: HParams
    modules: list[tuple[str, str]]
    parameters: dict[str, tuple[int, ...]]
    ancestry: dict[str, list[str]]
    # Which class was built for the module tree, and how it was chosen.
    model_class: str = ""
    auto_class: str = ""
    # Names and shapes in the built (meta) model: what ``model.state_dict()`` and a
    # ``torch.export`` graph signature call them.
    runtime_parameters: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # safetensors dtype of each checkpoint tensor ("F32", "BF16"...); empty for model_type sources.
    parameter_dtypes: dict[str, str] = field(default_factory=dict)
    # Checkpoint files read (relative to the folder).
    files: list[str] = field(default_factory=list)
    # For folders: checkpoint tensors compared with what transformers would save for this config.
    checkpoint_diff: dict | None = None
    # Things worth knowing that are not errors (remote code ignored, renamed tensors...).
    notes: list[str] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        total = 0
        for shape in self.parameters.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def module_classes(self) -> dict[str, int]:
        """Class name -> number of modules of that class."""
        counts: dict[str, int] = {}
        for _, cls in self.modules:
            counts[cls] = counts.get(cls, 0) + 1
        return counts

    def to_json(self) -> dict:
        """A JSON-serializable dict (tuples become lists)."""
        return {
            "source": self.source,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "model_class": self.model_class,
            "auto_class": self.auto_class,
            "hparams": self.hparams.to_json(),
            "ancestry": {k: list(v) for k, v in self.ancestry.items()},
            "modules": [[path, cls] for path, cls in self.modules],
            "parameters": {k: list(v) for k, v in self.parameters.items()},
            "parameter_dtypes": dict(self.parameter_dtypes),
            "runtime_parameters": {k: list(v) for k, v in self.runtime_parameters.items()},
            "num_parameters": self.num_parameters,
            "files": list(self.files),
            "checkpoint_diff": self.checkpoint_diff,
            "notes": list(self.notes),
            "config": _jsonable(self.config),
        }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------
# transformers helpers (imported lazily: importing transformers takes seconds)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logger (warnings about default configs go to stderr otherwise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def known_model_types() -> list[str]:
    """Every model_type this transformers installation implements."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def _unknown_model_type(model_type: str, where: str) -> ModelError:
    import transformers

    close = difflib.get_close_matches(model_type, known_model_types(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelError(
        f"{where}: unknown model_type {model_type!r}: transformers {transformers.__version__} does not "
        f"implement it.{hint} (If the checkpoint ships its own modeling code, its config.json needs an "
        f"auto_map and you must pass --trust-remote-code.)"
    )


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# Sources


def _resolve_source(source: str | Path) -> tuple[str, Any]:
    """("folder", Path) or ("model_type", name)."""
    if isinstance(source, Path):
        return "folder", source
    text = str(source)
    if text.startswith(MODEL_TYPE_PREFIX):
        return "model_type", text[len(MODEL_TYPE_PREFIX) :]
    path = Path(text).expanduser()
    if path.exists():
        return "folder", path
    looks_like_path = (
        "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith((".json", ".safetensors"))
    )
    if looks_like_path:
        return "folder", path
    if re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        return "model_type", text
    return "folder", path


def _read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:12]
        raise ModelError(
            f"{folder}: no config.json. porter needs a transformers checkpoint folder (config.json and "
            f"*.safetensors, as written by save_pretrained). Files present: {', '.join(present) or 'none'}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path} is not UTF-8 text ({exc}).") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        line = text.splitlines()[exc.lineno - 1] if 0 < exc.lineno <= len(text.splitlines()) else ""
        raise ModelError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            + (f": {line.strip()[:120]!r}" if line.strip() else "")
            + ". Fix the file (it must be one JSON object)."
        ) from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object, found {type(raw).__name__}.")
    return raw


def _load_folder_config(folder: Path, raw: dict, trust_remote_code: bool, notes: list[str]):
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map")
    where = str(folder / "config.json")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(
            f"{where} has no \"model_type\". Every transformers checkpoint names its architecture there "
            f"(e.g. \"llama\"); add it."
        )
    native = _config_class(model_type)
    if auto_map:
        if trust_remote_code:
            try:
                return AutoConfig.from_pretrained(str(folder), trust_remote_code=True), True
            except Exception as exc:  # remote code can fail in any way
                raise ModelError(f"{folder}: loading the checkpoint's own configuration code failed: {exc}") from exc
        if native is None:
            files = sorted({str(v).split(".")[0] + ".py" for v in _flatten(auto_map)})
            raise ModelError(
                f"{folder} uses custom code (config.json auto_map -> {', '.join(files)}) for model_type "
                f"{model_type!r}, which transformers does not implement. porter never runs code from a "
                f"checkpoint unless asked: read those files, then pass --trust-remote-code "
                f"(trust_remote_code=True) to use them."
            )
        notes.append(
            f"config.json has an auto_map (custom code), but transformers implements model_type "
            f"{model_type!r} natively: using the native implementation. Pass --trust-remote-code to use "
            f"the checkpoint's code instead."
        )
    if native is None:
        raise _unknown_model_type(model_type, where)
    try:
        config = native.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    except Exception as exc:
        raise ModelError(f"{where}: transformers' {native.__name__} rejected this config: {exc}") from exc
    return config, False


def _flatten(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, str):
        yield value.split("--")[-1]


def _default_config(model_type: str):
    from transformers import AutoConfig

    if _config_class(model_type) is None:
        raise _unknown_model_type(model_type, "model_type")
    try:
        return AutoConfig.for_model(model_type)
    except Exception as exc:
        raise ModelError(f"transformers could not build a default {model_type!r} config: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# safetensors headers


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}).") from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelError(
                f"{folder}: the shard index lists {len(names)} files but {len(missing)} are missing: "
                f"{', '.join(missing[:5])}. The download is incomplete."
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    # Mistral repositories ship a mistral-format consolidated.safetensors next to the HF shards.
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    files = hf_files or files
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if bins:
            raise ModelError(
                f"{folder} has no *.safetensors weights, only {', '.join(bins[:3])}. porter reads only "
                f"safetensors (pickle files can run code when loaded). Convert them once in a trusted "
                f"environment, e.g. AutoModel.from_pretrained(folder).save_pretrained(folder)."
            )
        raise ModelError(
            f"{folder} has no *.safetensors weights. A checkpoint folder needs config.json and "
            f"model.safetensors (or sharded model-XXXXX-of-XXXXX.safetensors with an index)."
        )
    return files


def _read_safetensors_headers(folder: Path) -> tuple[dict, dict, list[str]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    files = _safetensors_files(folder)
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in shapes:
                        raise ModelError(f"{folder}: tensor {name!r} appears in more than one safetensors file.")
                    shapes[name] = tuple(int(d) for d in sl.get_shape())
                    dtypes[name] = str(sl.get_dtype())
        except ModelError:
            raise
        except Exception as exc:  # SafetensorError, OSError: truncated or corrupt header
            raise ModelError(
                f"{path} is not a readable safetensors file ({exc}). It may be truncated or corrupt: "
                f"download it again."
            ) from exc
    return shapes, dtypes, [p.name for p in files]


# ----------------------------------------------------------------------------------------------
# Meta model


def _encoder_only(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _build_meta_model(config, *, architectures: list[str], remote: bool, trust_remote_code: bool):
    """Build the model on the meta device. Returns (model, how it was chosen)."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    def build(fn, *args, **kwargs):
        with torch.device("meta"):
            return fn(*args, **kwargs)

    errors: list[str] = []
    if remote:
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                return build(auto.from_config, config, trust_remote_code=trust_remote_code), auto.__name__
            except Exception as exc:
                errors.append(f"{auto.__name__}: {exc}")
        raise ModelError(f"the checkpoint's own modeling code could not build the model: {'; '.join(errors)}")

    # The class the checkpoint was saved from, when transformers has it (BertModel, not BertLMHeadModel).
    for arch in architectures:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            config_class = getattr(cls, "config_class", None)
            if config_class is not None and not isinstance(config, config_class):
                continue
            try:
                return build(cls._from_config, config), "config.architectures"
            except Exception as exc:
                errors.append(f"{arch}: {exc}")
    model_type = config.model_type
    autos = [AutoModel] if _encoder_only(model_type) else [AutoModelForCausalLM, AutoModel]
    for auto in autos:
        try:
            return build(auto.from_config, config), auto.__name__
        except ValueError as exc:  # "Unrecognized configuration class": try the next auto class
            errors.append(f"{auto.__name__}: {exc}")
        except Exception as exc:
            raise ModelError(
                f"transformers could not build a {model_type!r} model from this config "
                f"({auto.__name__}): {type(exc).__name__}: {exc}"
            ) from exc
    raise ModelError(f"no transformers model class builds model_type {model_type!r}: {'; '.join(errors)}")


def _checkpoint_names(model) -> tuple[dict[str, tuple[int, ...]], bool]:
    """The names and shapes save_pretrained would write (tied weights dropped, renames reverted).

    Also says whether transformers renames/fuses tensors between checkpoint and module tree.
    """
    state = model.state_dict()
    renamed = False
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        untied = remove_tied_weights_from_state_dict(dict(state), model)
        state = revert_weight_conversion(model, untied)
        renamed = set(state) != set(untied)
    except Exception:  # private helpers: if they change, fall back to runtime names
        pass
    return {name: tuple(int(d) for d in t.shape) for name, t in state.items()}, renamed


def _ignore_patterns(model) -> tuple[re.Pattern | None, re.Pattern | None]:
    """Regexes of names transformers ignores when missing / unexpected at load time.

    Mirrors ``PreTrainedModel._adjust_missing_and_unexpected_keys``: the model's own
    ``_keys_to_ignore_on_load_*`` plus old persistent buffers (``rotary_emb.inv_freq``,
    ``position_ids``) that older checkpoints still carry.
    """
    missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        unexpected.add(r"(^|\.)position_ids$")

    def compile_(patterns):
        return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None

    return compile_(missing), compile_(unexpected)


def _diff(checkpoint: dict, expected: dict, ignore: tuple) -> dict:
    ignore_missing, ignore_unexpected = ignore
    missing, unexpected, ignored = [], [], []
    for k in sorted(expected):
        if k not in checkpoint:
            (ignored if ignore_missing and ignore_missing.search(k) else missing).append(k)
    for k in sorted(checkpoint):
        if k not in expected:
            (ignored if ignore_unexpected and ignore_unexpected.search(k) else unexpected).append(k)
    mismatched = {
        k: {"checkpoint": list(checkpoint[k]), "expected": list(expected[k])}
        for k in sorted(checkpoint)
        if k in expected and tuple(checkpoint[k]) != tuple(expected[k])
    }
    # ignored: names transformers itself skips silently when loading (old buffers and the like)
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": mismatched, "ignored": ignored}


# ----------------------------------------------------------------------------------------------
# Public API


def introspect(source: str | Path, *, trust_remote_code: bool = False, module_tree: bool = True) -> ModelInfo:
    """Describe a checkpoint folder or a bare ``model_type`` (transformers' default config).

    ``source`` is a folder with ``config.json`` and ``*.safetensors`` (sharded or not), or a
    model_type name such as ``"qwen3"`` (also spelled ``"model_type:qwen3"``). No weight is
    loaded. Raises :class:`porter.errors.ModelError` with an actionable message on bad input.

    ``module_tree=False`` (folders only) skips building the meta model, so torch is not needed:
    ``modules`` and ``runtime_parameters`` stay empty and hparams come from the config and the
    safetensors names alone. Conversion of a model_type a plugin ports needs nothing more.
    """
    from porter.plugins import register_transformers_classes

    register_transformers_classes(models=module_tree)  # model types plugins define themselves
    kind, value = _resolve_source(source)
    notes: list[str] = []
    with _quiet_transformers():
        if kind == "model_type":
            config = _default_config(value)
            return introspect_config(config, source=f"{MODEL_TYPE_PREFIX}{value}", notes=notes)

        folder: Path = value
        if not folder.exists():
            raise ModelError(
                f"{folder}: no such folder. Pass a checkpoint folder (config.json + *.safetensors) or a "
                f"transformers model_type such as 'llama'."
            )
        if not folder.is_dir():
            raise ModelError(
                f"{folder} is a file; pass the checkpoint folder that contains config.json and *.safetensors."
            )
        raw = _read_config_json(folder)
        config, remote = _load_folder_config(folder, raw, trust_remote_code, notes)
        shapes, dtypes, files = _read_safetensors_headers(folder)
        if not module_tree:
            return _describe_from_headers(config, str(folder), notes, shapes, dtypes, files, raw)
        return introspect_config(
            config,
            source=str(folder),
            notes=notes,
            checkpoint=(shapes, dtypes, files),
            remote=remote,
            trust_remote_code=trust_remote_code,
            raw_config=raw,
        )


def _architectures(config) -> list[str]:
    """config.json's ``architectures``: a list of class names (transformers accepts anything)."""
    value = getattr(config, "architectures", None) or []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"config.json: \"architectures\" is {value!r}; it must be a list of transformers class "
                         "names such as [\"LlamaForCausalLM\"]: fix the checkpoint's config.json")
    return list(value)


def _describe_from_headers(config, source: str, notes: list[str], parameters: dict, dtypes: dict,
                           files: list[str], raw_config: dict) -> ModelInfo:
    """ModelInfo from the config and safetensors headers only (no meta model, no torch)."""
    model_type = str(getattr(config, "model_type", "") or "")
    architectures = _architectures(config)
    config_dict = config.to_dict()
    if "auto_map" in raw_config and "auto_map" not in config_dict:
        config_dict["auto_map"] = raw_config["auto_map"]
    return ModelInfo(
        source=source, model_type=model_type, architectures=architectures, config=config_dict,
        hparams=hparams_from_config(config, parameters=parameters), modules=[], parameters=dict(parameters),
        ancestry=ancestry_of(model_type), model_class=architectures[0] if architectures else "",
        parameter_dtypes=dict(dtypes), files=list(files),
        notes=[*notes, "module tree not built (module_tree=False): hparams come from config.json and tensor names."],
    )


def introspect_config(
    config,
    *,
    source: str | None = None,
    notes: list[str] | None = None,
    checkpoint: tuple[dict, dict, list[str]] | None = None,
    remote: bool = False,
    trust_remote_code: bool = False,
    raw_config: dict | None = None,
) -> ModelInfo:
    """Describe the model a transformers config builds (for example a tiny test config).

    With no ``checkpoint`` the parameters are those transformers would save for this config.
    """
    from porter.plugins import register_transformers_classes

    register_transformers_classes(models=True)
    notes = list(notes or [])
    model_type = str(getattr(config, "model_type", "") or "")
    architectures = _architectures(config)
    with _quiet_transformers():
        model, auto_class = _build_meta_model(
            config, architectures=architectures, remote=remote, trust_remote_code=trust_remote_code
        )
        modules = [(path, type(m).__name__) for path, m in model.named_modules()]
        runtime = {name: tuple(int(d) for d in t.shape) for name, t in model.state_dict().items()}
        expected, renamed = _checkpoint_names(model)
        ignore = _ignore_patterns(model)
    if not architectures:
        architectures = [type(model).__name__]

    diff = None
    if checkpoint is not None:
        parameters, dtypes, files = checkpoint
        diff = _diff(parameters, expected, ignore)
        n_miss, n_unexp, n_shape = (len(diff[k]) for k in ("missing", "unexpected", "shape_mismatch"))
        if n_miss or n_unexp or n_shape:
            notes.append(
                f"checkpoint vs. what transformers would save for this config: {n_miss} missing, "
                f"{n_unexp} unexpected, {n_shape} shape mismatches (see checkpoint_diff)."
            )
    else:
        parameters, dtypes, files = expected, {}, []
    if renamed:
        notes.append(
            "transformers renames or fuses some tensors when it loads this checkpoint; module-tree "
            "names are in runtime_parameters."
        )

    hparams = hparams_from_config(config, parameters=parameters, modules=modules)
    config_dict = config.to_dict()
    if raw_config is not None and "auto_map" in raw_config and "auto_map" not in config_dict:
        config_dict["auto_map"] = raw_config["auto_map"]
    return ModelInfo(
        source=source or f"{MODEL_TYPE_PREFIX}{model_type}",
        model_type=model_type,
        architectures=architectures,
        config=config_dict,
        hparams=hparams,
        modules=modules,
        parameters=dict(parameters),
        ancestry=ancestry_of(model_type) if not remote else {},
        model_class=type(model).__name__,
        auto_class=auto_class,
        runtime_parameters=runtime,
        parameter_dtypes=dict(dtypes),
        files=list(files),
        checkpoint_diff=diff,
        notes=notes,
    )
