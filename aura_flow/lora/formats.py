"""LoRA files: reading the header lazily, grouping keys into modules, telling the algorithm of each module from its
tensors, and the scale rules of each format.

Scale rules (the formats' own tools are the reference):
- LoRA (kohya, diffusers / peft, lycoris "lora"): ``alpha / rank`` with alpha from the module's ``.alpha`` tensor;
  else from peft's adapter config (diffusers' ``lora_adapter_metadata`` in the safetensors header, or an
  ``adapter_config.json`` beside the file: ``lora_alpha``, ``alpha_pattern``, ``use_rslora`` → alpha / √rank);
  else 1. A zero alpha means alpha = rank, as in kohya and lycoris.
- LoKr (lycoris): 1 when both Kronecker sides are full matrices; else ``alpha / rank`` with the rank of the
  factorised ``lokr_w1_a`` if there is one, else of ``lokr_w2_a`` (lycoris' ``rank_scale``).
- LoHa (lycoris): ``alpha / rank``, rank = ``hada_w1_b``'s rows.
- full (lycoris ``diff`` / ``diff_b``): no scale.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LoadError
from ..weights.reader import MAX_TENSORS
from .keys import PARAMETERS, is_text_encoder, split_key
from .peft_config import PatternMatcher, checked_config, parse_json, read_sidecar
from .patches import Factor, FullPatch, LoHaPatch, LoKrPatch, LowRankPatch, rank_scale

log = logging.getLogger(__name__)

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the peft config here (json)
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}  # safetensors' names
INT_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
MAX_RANK_READ = 1024  # a factor up to this rank is read for any layer (real LoRAs: 4..256)


@dataclass
class ModuleGroup:
    """The keys of one LoRA module (one patched layer): ``params`` maps a role of `keys.PARAMETERS` to its key."""
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def algorithm(self) -> str | None:
        roles = self.params
        if any(r.startswith("lokr_") for r in roles):
            return "lokr"
        if any(r.startswith("hada_") for r in roles):
            return "loha"
        if "diff" in roles:
            return "full"
        if "down" in roles or "up" in roles:
            return "lora"
        return None

    @property
    def style(self) -> str:
        """The key style, for the report: which tool's spelling the file uses."""
        keys = self.params.values()  # all of them: a file's first key may be the module's alpha
        if self.algorithm in ("lokr", "loha", "full") or self.path.startswith("lycoris_"):
            return f"lycoris {self.algorithm}"
        if any(".lora_A" in key or ".lora_B" in key for key in keys):
            return "diffusers/peft lora"
        return "kohya lora"


class LoraFile:
    """A LoRA ``.safetensors`` file, read lazily: opening it reads only the header (keys and metadata); tensors are
    read by `read` for the modules that are used."""

    FOLDER_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers', peft's

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            found = [self.path / n for n in self.FOLDER_NAMES if (self.path / n).is_file()]
            if not found:
                raise LoadError(f"{self.path}: a folder without {' or '.join(self.FOLDER_NAMES)}; give the LoRA's "
                                f".safetensors file itself.")
            self.path = found[0]
        if not self.path.exists():
            raise LoadError(f"{self.path}: LoRA file not found. Check the path (LoRAs go in ComfyUI's models/loras).")
        if not self.path.is_file():  # a FIFO would block the reader, a device never end
            raise LoadError(f"{self.path}: exists but is not a regular file (a pipe, a device or a socket); give the "
                            "LoRA's .safetensors file itself.")
        if self.path.suffix.lower() != ".safetensors":
            raise LoadError(f"{self.path.name}: only .safetensors LoRAs are read (pickled .pt/.ckpt files can run "
                            f"code when loaded). Convert it to safetensors first.")
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                self.keys = list(f.keys())
                if len(self.keys) > MAX_TENSORS:  # checked before each key's header is looked at
                    raise LoadError(f"{self.path.name}: holds {len(self.keys):,} tensors, more than a LoRA of this "
                                    f"model can have (at most {MAX_TENSORS:,}); the file is damaged or not a LoRA.")
                self.metadata = dict(f.metadata() or {})
                # each tensor's shape and dtype from the header: sizes are checked before any tensor is read
                self.header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in self.keys}
        except LoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise LoadError(f"{self.path.name}: not a readable safetensors file ({exc}). Download it again.") from exc
        self.groups: dict[str, ModuleGroup] = {}
        self.unknown_keys: list[str] = []
        for key in self.keys:
            split = split_key(key)
            if split is None:
                self.unknown_keys.append(key)
                continue
            path, param = split
            self.groups.setdefault(path, ModuleGroup(path)).params[PARAMETERS[param]] = key
        self.peft_config = self._peft_config()
        self._patterns = PatternMatcher(self.name)

    @property
    def name(self) -> str:
        return self.path.name

    def __repr__(self):
        return f"LoraFile({str(self.path)!r}, {len(self.groups)} modules)"

    def text_encoder_groups(self) -> list[ModuleGroup]:
        return [g for g in self.groups.values() if is_text_encoder(g.path)]

    def check_sizes(self, keys, layer_shape) -> None:
        """From the header, before a byte is read: each of ``keys`` is a float tensor (alpha: any number) no larger
        than a patch of a ``layer_shape`` (out, in) layer can use, so a huge or odd tensor is never read."""
        out_f, in_f = layer_shape
        limit = max(out_f * in_f, MAX_RANK_READ * (out_f + in_f)) + out_f + in_f
        for key in keys:
            shape, dtype = self.header[key]
            numel = math.prod(shape)
            if numel > limit:
                raise LoadError(f"{self.name}: tensor {key} has shape {shape} ({numel:,} values), more than any patch of "
                                f"a {out_f}x{in_f} layer uses (at most {limit:,}); it is not read. The file is damaged "
                                "or not a LoRA for this model.")
            if dtype not in FLOAT_DTYPES and not (key.endswith(".alpha") and dtype in INT_DTYPES):
                raise LoadError(f"{self.name}: tensor {key} is stored as {dtype}, expected floating-point values "
                                f"({', '.join(sorted(FLOAT_DTYPES))}); the file is damaged or not a LoRA.")

    def read(self, keys) -> dict:
        """The tensors of ``keys`` (only those are read from disk), each checked to hold finite values: a LoRA with
        NaN or infinite weights is named here, not by a NaN image later."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in keys}
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):  # fp8 has no isfinite
                bad = int((~torch.isfinite(t.float())).sum())
                raise LoadError(f"{self.name}: tensor {key} holds NaN or infinite values ({bad:,} of {t.numel():,}); "
                                "the LoRA is damaged (or was trained into an overflow) and would turn every image "
                                "into NaN. Download it again or train it again.")
        return tensors

    def _peft_config(self) -> dict | None:
        """peft's LoraConfig as a dict, from diffusers' metadata (keys prefixed ``transformer.``) or from peft's
        ``adapter_config.json`` beside an ``adapter_model.safetensors``; its values checked (`peft_config`)."""
        raw = self.metadata.get(PEFT_METADATA_KEY)
        if raw:
            return checked_config(parse_json(raw, self.name, PEFT_METADATA_KEY), self.name, PEFT_METADATA_KEY)
        sidecar = self.path.with_name("adapter_config.json")
        if sidecar.is_file():
            return checked_config(read_sidecar(sidecar, self.name), str(sidecar), "adapter_config.json")
        return None

    # ------------------------------------------------------------ patches
    def make_patch(self, group: ModuleGroup, layer_name: str, tensors: dict | None = None):
        """``(patch, magnitude or None)`` for one module group. ``tensors`` holds its keys' tensors (read now when
        not given); ``layer_name`` (the diffusers module name) is what peft's ``alpha_pattern`` is matched against."""
        algorithm = group.algorithm
        if algorithm is None:
            raise LoadError(f"{self.name}: {group.path} has only {', '.join(sorted(group.params))} and no weights; "
                            f"the file is incomplete.")
        t = tensors if tensors is not None else self.read(group.params.values())
        w = {role: t[key] for role, key in group.params.items()}
        alpha = w.get("alpha")
        if alpha is not None:
            self._check(alpha.numel() == 1, group, f"alpha {group.params['alpha']} holds {alpha.numel()} values, "
                                                   "expected one number")
            alpha = float(alpha.float().reshape(-1)[0])
            self._check(math.isfinite(alpha), group, f"alpha is {alpha}, expected a finite number")
        if algorithm == "lora":
            self._need(group, w, "down", "up")
            if "mid" in w:
                raise LoadError(f"{self.name}: {group.params['mid']} is a Tucker (conv) LoRA core; AuraFlow's "
                                f"transformer has no conv layers, so this file is for another model.")
            down, up = w["down"], w["up"]
            self._check(down.dim() == 2 and up.dim() == 2 and down.shape[0] == up.shape[1], group,
                        f"down {tuple(down.shape)} and up {tuple(up.shape)} do not chain")
            self._check(down.shape[0] > 0, group, f"rank 0 (down {tuple(down.shape)}, up {tuple(up.shape)}): no change "
                                                  "to apply")
            patch = LowRankPatch(down, up, self._lora_scale(alpha, down.shape[0], layer_name))
        elif algorithm == "lokr":
            w1 = self._factor(group, w, "lokr_w1", "lokr_t1")
            w2 = self._factor(group, w, "lokr_w2", "lokr_t2")
            if w1.rank is None and w2.rank is None:
                scale = 1.0  # both sides full: lycoris forces alpha = rank
            else:
                scale = rank_scale(alpha, w1.rank if w1.rank is not None else w2.rank)
            patch = LoKrPatch(w1, w2, scale)
        elif algorithm == "loha":
            w1 = self._factor(group, w, "hada_w1", "hada_t1", full_allowed=False)
            w2 = self._factor(group, w, "hada_w2", "hada_t2", full_allowed=False)
            self._check(tuple(w1.shape) == tuple(w2.shape), group,
                        f"the two Hadamard factors are {tuple(w1.shape)} and {tuple(w2.shape)}")
            patch = LoHaPatch(w1, w2, rank_scale(alpha, w1.rank))
        else:
            patch = FullPatch(w["diff"], w.get("diff_b"))
            self._check(patch.diff.dim() == 2, group, f"diff has shape {tuple(patch.diff.shape)}")
            if patch.diff_b is not None:
                self._check(tuple(patch.diff_b.shape) == patch.shape[:1], group,
                            f"diff_b {tuple(patch.diff_b.shape)} does not fit diff {patch.shape}")
        return patch, w.get("magnitude")

    def _lora_scale(self, alpha, rank, layer_name) -> float:
        if alpha is not None or not self.peft_config:
            return rank_scale(alpha, rank)
        cfg = self.peft_config
        ranks = cfg.get("rank_pattern") or {}
        want = self._patterns.first(ranks, layer_name, "rank_pattern") if ranks else None
        want = cfg.get("r") if want is None else want
        if want is not None and want != rank:
            raise LoadError(f"{self.name}: its peft config gives layer {layer_name} rank {want} (r / rank_pattern), but "
                            f"its tensors have rank {rank}; the metadata does not match the weights. Fix or remove "
                            f"the {PEFT_METADATA_KEY} metadata")
        lora_alpha = cfg.get("lora_alpha")
        lora_alpha = rank if lora_alpha is None else lora_alpha
        patterns = cfg.get("alpha_pattern") or {}
        if patterns:  # peft's rule: the first pattern that ends the module name at a dot boundary
            hit = self._patterns.first(patterns, layer_name, "alpha_pattern")
            lora_alpha = lora_alpha if hit is None else hit
        return rank_scale(lora_alpha, rank, rs=bool(cfg.get("use_rslora")))

    def _factor(self, group, w, stem, core, full_allowed=True) -> Factor:
        if full_allowed and f"{stem}" in w:
            return Factor(full=w[stem])
        self._need(group, w, f"{stem}_a", f"{stem}_b")
        a, b, t = w[f"{stem}_a"], w[f"{stem}_b"], w.get(core)
        self._check(a.dim() == 2 and b.dim() == 2 and min(a.shape) > 0 and min(b.shape) > 0, group,
                    f"{stem}_a {tuple(a.shape)} and {stem}_b {tuple(b.shape)}: expected two matrices of rank >= 1")
        if t is not None:
            self._check(t.dim() == 2 and a.shape[0] == t.shape[0] and b.shape[0] == t.shape[1], group,
                        f"Tucker core {tuple(t.shape)} with factors {tuple(a.shape)}, {tuple(b.shape)} (conv "
                        f"layers are not part of AuraFlow's transformer)")
        else:
            self._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0], group,
                        f"{stem}_a {tuple(a.shape)} and {stem}_b {tuple(b.shape)} do not chain")
        return Factor(a=a, b=b, t=t)

    def _need(self, group, w, *roles):
        missing = [r for r in roles if r not in w]
        if missing:
            raise LoadError(f"{self.name}: module {group.path} has {', '.join(sorted(w))} but no "
                            f"{', '.join(missing)}; the file is incomplete or in a variant this loader does not read.")

    def _check(self, ok, group, what):
        if not ok:
            raise LoadError(f"{self.name}: module {group.path}: {what}. The file is damaged or not a LoRA for a "
                            f"linear layer.")
