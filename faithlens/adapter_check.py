"""Adapters are data, not code: check a LoRA adapter directory against the served base model before
anything touches the model. The server (before it queues a load) and the engine (before it attaches)
run these checks; the trainer writes the base model's identity next to every adapter it saves.

An adapter directory is peft's layout: ``adapter_config.json`` and ``adapter_model.safetensors``, plus
``base_model.json`` when faithlens' trainer wrote it. Left to itself, peft would take all of this:

* any tensor in the weights file (it passes every key to ``load_state_dict``): one extra
  ``embed_tokens.weight`` overwrote the base model's embeddings for every tenant, for good;
* any field of ``adapter_config.json``: ``layer_replication`` duplicated the base model's layers,
  ``modules_to_save`` replaces whole modules, DoRA or ``lora_bias`` add parameters of their own;
* any rank: peft allocates rank × features per targeted module before it reads a single weight, so a
  38 KB file declaring ``r: 100000`` took gigabytes and stalled the engine;
* an adapter trained on another base model.

So only LoRA A/B matrices of linear modules the base model has, in the shapes their in/out features and
the declared rank give, are allowed; the config is an allow-list (every other field must keep peft's
default); the rank is capped by ``FAITHLENS_MAX_LORA_RANK``; and the base model must match. Only headers
are read (safetensors' ``safe_open``) until every check passed; :meth:`CheckedAdapter.tensors` then reads
exactly the checked tensors, and they are all that :func:`faithlens.lora.attach` hands to peft.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from faithlens.engine.errors import (
    AdapterBaseMismatch,
    AdapterConfigRefused,
    AdapterInvalidKeys,
    AdapterRankTooLarge,
    AdapterRefused,
    AdapterShapeMismatch,
)
from faithlens.model import LoadedModel, unwrap

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_IDENTITY = "base_model.json"  # written by the trainer: which base model the adapter was trained on

MAX_JSON_BYTES = 1 << 20  # peft's config is ~2 KB, the identity ~10 KB
MAX_HEADER_BYTES = 1 << 20  # a safetensors header is ~150 bytes per tensor
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
_NAME = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
# peft's saved form: base_model.model.<module>.lora_A.weight (the adapter's own name is stripped)
LORA_KEY = re.compile(rf"^base_model\.model\.(?P<module>{_NAME})\.lora_(?P<part>[AB])\.weight$")
MODULE_NAME = re.compile(rf"^{_NAME}$")
# The base model's structure, compared exactly; then sampled weights, compared within dtype rounding.
STRUCTURE = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
PROBE_REL_TOL, PROBE_ABS_TOL = 1e-2, 1e-5  # float32 vs bfloat16/float16 copies of the same weights


# -- the config's allow-list ---------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _module_names(value: Any) -> bool:
    """A list of module names (peft reads a plain string as a regular expression: refused)."""
    return (
        isinstance(value, list)
        and 0 < len(value) <= 64
        and all(isinstance(v, str) and MODULE_NAME.match(v) for v in value)
    )


def _auto_mapping(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict)
        and set(value) <= {"base_model_class", "parent_library"}
        and all(isinstance(v, str) and MODULE_NAME.match(v) for v in value.values())
    )


def _short_string(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= 4096 and "\x00" not in value)


# The fields an adapter may set, each with what it may be. Every other field peft knows must keep peft's
# default; a field peft does not know is refused.
ALLOWED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (lambda v: v == "LORA", '"LORA"'),
    "r": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (_module_names, "a list of module names"),
    "bias": (lambda v: v == "none", '"none"'),
    "task_type": (lambda v: v in (None, "CAUSAL_LM"), 'null or "CAUSAL_LM"'),
    "base_model_name_or_path": (_short_string, "null or a string"),
    "revision": (_short_string, "null or a string"),
    "peft_version": (_short_string, "null or a string"),
    "fan_in_fan_out": (lambda v: v is False, "false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    # peft's note of the base model's class (for AutoPeftModel, which is never used here): only read
    "auto_mapping": (_auto_mapping, "null or {base_model_class, parent_library}"),
    # every LoRA matrix is loaded (the key check demands all of them), so the initialisation never shows;
    # the other initialisations (PiSSA, OLoRA, LoftQ...) rewrite the base weights and stay refused
    "init_lora_weights": (lambda v: isinstance(v, bool), "true or false"),
    # scales the adapter's own output, never the base model's
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
}
REQUIRED_FIELDS = ("peft_type", "r", "target_modules")
# passed to LoraConfig; the others are bookkeeping (inference_mode is set by the loader)
CONFIG_KWARGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "use_rslora")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@functools.cache
def peft_defaults() -> dict[str, str]:
    """What peft's ``save_pretrained`` writes for a default ``LoraConfig``, field by field (canonical JSON)."""
    from peft import LoraConfig

    written = json.loads(json.dumps(LoraConfig().to_dict(), default=_json_default))
    return {key: _canonical(value) for key, value in written.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def check_config(config: Any, max_rank: int) -> dict[str, Any]:
    """The allow-listed fields of ``adapter_config.json``, or an :class:`AdapterRefused` saying why not."""
    if not isinstance(config, dict):
        raise AdapterConfigRefused(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterConfigRefused(
            f"the adapter is of type {str(config.get('peft_type'))[:40]!r}; only LORA adapters are served"
        )
    defaults = peft_defaults()
    for key, value in config.items():
        if key in ALLOWED_FIELDS:
            allowed, what = ALLOWED_FIELDS[key]
            if not allowed(value):
                raise AdapterConfigRefused(f"{ADAPTER_CONFIG}: {key} must be {what}")
        elif key not in defaults:
            raise AdapterConfigRefused(f"{ADAPTER_CONFIG}: unknown field {str(key)[:80]!r}")
        elif _canonical(value) != defaults[key]:
            raise AdapterConfigRefused(
                f"{ADAPTER_CONFIG}: {key} is set; it would change the base model or the adapter's form, "
                f"and only plain LoRA is served (it must stay {defaults[key][:80]})"
            )
    missing = [key for key in REQUIRED_FIELDS if key not in config]
    if missing:
        raise AdapterConfigRefused(f"{ADAPTER_CONFIG} lacks {', '.join(missing)}")
    if config["r"] > max_rank:
        raise AdapterRankTooLarge(
            f"the adapter's rank is {config['r']}; the limit is {max_rank} (FAITHLENS_MAX_LORA_RANK)",
            config["r"],
            max_rank,
        )
    return {key: config[key] for key in CONFIG_KWARGS if key in config}


# -- files ---------------------------------------------------------------------------------------------------------
def _regular_file(directory: Path, name: str) -> Path:
    path = directory / name
    if path.is_symlink() or not path.is_file():  # a FIFO would block the reader; a link may lead anywhere
        raise AdapterRefused(f"the adapter has no {name} (a regular file)")
    return path


def _read_json(directory: Path, name: str) -> Any:
    path = _regular_file(directory, name)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise AdapterRefused(f"the adapter's {name} cannot be read") from exc
    if len(raw) > MAX_JSON_BYTES:
        raise AdapterRefused(f"the adapter's {name} is over {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise AdapterRefused(f"the adapter's {name} is not JSON") from exc


def read_weight_header(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype and shape, from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open

    path = _regular_file(directory, ADAPTER_WEIGHTS)
    try:
        with path.open("rb") as f:  # the header's length, before safetensors parses (and holds) it
            declared = int.from_bytes(f.read(8), "little")
        if declared > MAX_HEADER_BYTES:
            raise AdapterRefused(f"the adapter's {ADAPTER_WEIGHTS} header is over {MAX_HEADER_BYTES} bytes")
        header = {}
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safetensors' handle is not iterable itself
            for key in names:
                info = f.get_slice(key)
                header[key] = (info.get_dtype(), tuple(info.get_shape()))
        return header
    except AdapterRefused:
        raise
    except Exception as exc:  # safetensors' own error type, OSError, ...: not a safetensors file
        raise AdapterRefused(f"the adapter's {ADAPTER_WEIGHTS} is not a valid safetensors file") from exc


# -- the adapter on its own --------------------------------------------------------------------------------------
@dataclass
class CheckedAdapter:
    """An adapter that passed the checks that need no model: its config fields and its LoRA matrices."""

    path: Path
    config: dict[str, Any]  # LoraConfig's keyword arguments
    declared_base: str | None  # adapter_config.json's base_model_name_or_path
    identity: dict | None  # base_model.json, when the trainer wrote one
    rank: int
    shapes: dict[str, tuple[int, int]]  # tensor key → shape
    dtypes: dict[str, str]

    @property
    def modules(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """Module name → (lora_A shape, lora_B shape)."""
        out = {}
        for key, shape in self.shapes.items():
            match = LORA_KEY.match(key)
            assert match is not None
            a, b = out.get(match["module"], (None, None))
            out[match["module"]] = (shape, b) if match["part"] == "A" else (a, shape)
        return out

    def targets(self, module: str) -> bool:
        """Whether peft puts a LoRA layer on ``module`` (its rule: the name, or its last dotted parts)."""
        return any(module == t or module.endswith("." + t) for t in self.config["target_modules"])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checked tensors (and nothing else in the file), re-checked as read."""
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt", device="cpu") as f:
                for key in self.shapes:
                    out[key] = f.get_tensor(key)
        except Exception as exc:
            raise AdapterRefused(f"the adapter's {ADAPTER_WEIGHTS} changed while it was loaded") from exc
        for key, tensor in out.items():
            if tuple(tensor.shape) != self.shapes[key] or not tensor.is_floating_point():
                raise AdapterRefused(f"the adapter's {ADAPTER_WEIGHTS} changed while it was loaded")
        return out


def check_files(path: Path, max_rank: int) -> CheckedAdapter:
    """Every check that needs no model: the files, the config's allow-list, the rank, and that the weights
    are LoRA A/B matrices of the targeted modules in the declared rank."""
    if not path.is_dir():
        raise AdapterRefused("the adapter path is not a directory")
    raw_config = _read_json(path, ADAPTER_CONFIG)
    config = check_config(raw_config, max_rank)
    rank = config["r"]
    header = read_weight_header(path)
    if not header:
        raise AdapterInvalidKeys(f"the adapter's {ADAPTER_WEIGHTS} holds no tensors")
    identity = None
    if (path / BASE_IDENTITY).exists() or (path / BASE_IDENTITY).is_symlink():
        identity = _check_identity_file(_read_json(path, BASE_IDENTITY))
    checked = CheckedAdapter(
        path,
        config,
        raw_config.get("base_model_name_or_path"),
        identity,
        rank,
        {},
        {},
    )
    for key, (dtype, shape) in header.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise AdapterInvalidKeys(
                f"{ADAPTER_WEIGHTS} holds {key[:120]!r}, which is not a LoRA A/B weight "
                "(only base_model.model.<module>.lora_A.weight / lora_B.weight are loaded)"
            )
        if dtype not in FLOAT_DTYPES:
            raise AdapterInvalidKeys(f"{key[:120]!r} is {dtype}; LoRA weights are F32, F16 or BF16")
        if len(shape) != 2:
            raise AdapterShapeMismatch(f"{key[:120]!r} has shape {list(shape)}; LoRA weights are matrices")
        if (shape[0] if match["part"] == "A" else shape[1]) != rank:
            raise AdapterShapeMismatch(
                f"{key[:120]!r} has shape {list(shape)}, which does not fit the declared rank {rank}"
            )
        if not checked.targets(match["module"]):
            raise AdapterInvalidKeys(f"{key[:120]!r} is for a module target_modules does not name")
        checked.shapes[key] = (shape[0], shape[1])
        checked.dtypes[key] = dtype
    for module, (a, b) in checked.modules.items():
        if a is None or b is None:
            raise AdapterInvalidKeys(f"{module[:120]!r} has lora_{'A' if a is None else 'B'} missing")
    return checked


def _check_identity_file(identity: Any) -> dict:
    ok = (
        isinstance(identity, dict)
        and isinstance(identity.get("structure"), dict)
        and isinstance(identity.get("probe"), list)
        and len(identity["probe"]) <= 1 << 16
        and all(_is_number(v) for v in identity["probe"])
    )
    if not ok:
        raise AdapterRefused(f"the adapter's {BASE_IDENTITY} is not a base model identity")
    return identity


# -- the base model ----------------------------------------------------------------------------------------------
def _base_name(name: str) -> str | None:
    """A module or parameter name of the base model with peft's wrapping taken out (None: peft's own)."""
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts):
        return None
    return ".".join(part for part in parts if part != "base_layer")


def base_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters by name, whether or not peft wraps it (its LoRA weights left out)."""
    out = []
    for name, param in unwrap(model).named_parameters():
        base = _base_name(name)
        if base is not None and param.numel():
            out.append((base, param))
    return sorted(out, key=lambda item: item[0])


@torch.no_grad()
def base_identity(model: torch.nn.Module, name: str) -> dict:
    """What identifies a base model across machines, devices and dtypes: its structure, and two weights of
    every parameter tensor (a fine-tune of the same architecture differs in all of them)."""
    net = unwrap(model)
    structure: dict[str, Any] = {key: getattr(net.config, key, None) for key in STRUCTURE}
    params = base_parameters(net)
    structure["parameters"] = len(params)
    picks = [p.detach().reshape(-1)[[p.numel() // 3, 2 * p.numel() // 3]] for _, p in params]
    probe = torch.cat([v.float().cpu() for v in picks]).tolist() if picks else []
    return {"name": name, "structure": structure, "probe": probe}


def write_base_identity(directory: Path, lm: LoadedModel) -> None:
    """Record, next to a saved adapter, which base model it was trained on (``base_model.json``)."""
    (directory / BASE_IDENTITY).write_text(json.dumps(base_identity(lm.model, lm.name)))


class BaseProfile:
    """What the checks need to know of the served base model: its linear modules' in/out features, its
    other modules' names, the names and paths it goes by, and (computed when needed) its identity."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.name = lm.name
        self.linear: dict[str, tuple[int, int]] = {}
        self.other_modules: set[str] = set()
        for name, module in unwrap(lm.model).named_modules():
            base = _base_name(name)
            if base is None or not base:
                continue
            if isinstance(module, torch.nn.Linear):
                self.linear[base] = (module.in_features, module.out_features)
            elif base not in self.linear:
                self.other_modules.add(base)
        self.other_modules -= set(self.linear)  # a peft wrapper of a linear module is that module
        source = lm.source
        given = [source.directory, source.directory / (source.gguf_file or "")]
        name_or_path = getattr(unwrap(lm.model).config, "_name_or_path", "") or ""
        if name_or_path:
            given.append(Path(name_or_path))
        self.paths = {p for p in (_resolved(g) for g in given) if p is not None}
        self.names = {n.lower() for n in (lm.name, source.name, Path(name_or_path).name) if n}
        if source.gguf_file:
            self.names.add(Path(source.gguf_file).stem.lower())
        self._identity: dict | None = None

    @property
    def identity(self) -> dict:
        if self._identity is None:
            self._identity = base_identity(self.lm.model, self.lm.name)
        return self._identity


def _resolved(path: Path) -> str | None:
    try:
        return str(path.expanduser().resolve())
    except (OSError, ValueError, RuntimeError):
        return None


def _same_identity(recorded: dict, served: dict) -> bool:
    if recorded["structure"] != served["structure"] or len(recorded["probe"]) != len(served["probe"]):
        return False
    return all(
        math.isclose(a, b, rel_tol=PROBE_REL_TOL, abs_tol=PROBE_ABS_TOL)
        for a, b in zip(recorded["probe"], served["probe"], strict=True)
    )


def _declared_base_matches(declared: str, profile: BaseProfile) -> bool:
    """peft's ``base_model_name_or_path``: the served model's own path, or (a path elsewhere, a hub id)
    the served model's name as its last part."""
    try:
        candidate = Path(declared).expanduser()
        if candidate.exists():
            return _resolved(candidate) in profile.paths
        return _resolved(candidate) in profile.paths or candidate.name.lower() in profile.names
    except (OSError, ValueError, RuntimeError):
        return False


def check_base(checked: CheckedAdapter, profile: BaseProfile) -> None:
    """The adapter was trained on the served base model: by the identity the trainer recorded, else by the
    base model peft recorded."""
    if checked.identity is not None:
        if not _same_identity(checked.identity, profile.identity):
            trained_on = str(checked.identity.get("name"))[:80]
            raise AdapterBaseMismatch(
                f"the adapter was trained on another base model ({trained_on!r}, by its recorded "
                f"identity); this server serves {profile.name!r}"
            )
        return
    declared = checked.declared_base
    if not declared:
        raise AdapterBaseMismatch(
            "the adapter does not say which base model it was trained on (no base_model_name_or_path "
            f"and no {BASE_IDENTITY})"
        )
    if not _declared_base_matches(declared, profile):
        raise AdapterBaseMismatch(
            f"the adapter was trained on {Path(declared).name[:80]!r}; this server serves {profile.name!r}"
        )


def check_modules(checked: CheckedAdapter, profile: BaseProfile) -> None:
    """Every LoRA matrix is for a linear module of the base model, in its in/out features, and every
    module peft would put a LoRA layer on has both of its matrices."""
    modules = checked.modules
    for module, (a, b) in modules.items():
        features = profile.linear.get(module)
        if features is None:
            raise AdapterInvalidKeys(f"the base model has no linear module {module[:120]!r}")
        in_features, out_features = features
        if a[1] != in_features or b[0] != out_features:
            raise AdapterShapeMismatch(
                f"{module[:120]!r}: LoRA shapes {list(a)} and {list(b)} do not fit its {in_features} in "
                f"and {out_features} out features"
            )
    targeted = [m for m in profile.linear if checked.targets(m)]
    missing = [m for m in targeted if m not in modules]
    if missing:
        raise AdapterInvalidKeys(f"target_modules names {missing[0][:120]!r}, but the weights lack its LoRA")
    not_linear = [m for m in profile.other_modules if checked.targets(m)]
    if not_linear:
        raise AdapterConfigRefused(
            f"target_modules names {not_linear[0][:120]!r}, which is not a linear layer"
        )
    if not targeted:
        raise AdapterConfigRefused("target_modules names no module of the base model")


def check_adapter(path: Path, profile: BaseProfile, max_rank: int) -> CheckedAdapter:
    """All the checks, in order: files and config, rank, keys and shapes, base model."""
    checked = check_files(path, max_rank)
    check_base(checked, profile)
    check_modules(checked, profile)
    return checked
