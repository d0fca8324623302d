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

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoadError
from .keys import PARAMETERS, is_text_encoder, split_key
from .patches import Factor, FullPatch, LoHaPatch, LoKrPatch, LowRankPatch, rank_scale

log = logging.getLogger(__name__)

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the peft config here (json)


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
        if not self.path.is_file():
            raise LoadError(f"{self.path}: LoRA file not found. Check the path (LoRAs go in ComfyUI's models/loras).")
        if self.path.suffix.lower() != ".safetensors":
            raise LoadError(f"{self.path.name}: only .safetensors LoRAs are read (pickled .pt/.ckpt files can run "
                            f"code when loaded). Convert it to safetensors first.")
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                self.keys = list(f.keys())
                self.metadata = dict(f.metadata() or {})
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

    @property
    def name(self) -> str:
        return self.path.name

    def __repr__(self):
        return f"LoraFile({str(self.path)!r}, {len(self.groups)} modules)"

    def text_encoder_groups(self) -> list[ModuleGroup]:
        return [g for g in self.groups.values() if is_text_encoder(g.path)]

    def read(self, keys) -> dict:
        """The tensors of ``keys`` (only those are read from disk)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}

    def _peft_config(self) -> dict | None:
        """peft's LoraConfig as a dict, from diffusers' metadata (keys prefixed ``transformer.``) or from peft's
        ``adapter_config.json`` beside an ``adapter_model.safetensors``."""
        raw = self.metadata.get(PEFT_METADATA_KEY)
        if raw:
            try:
                config = json.loads(raw)
            except ValueError:
                log.warning("%s: unreadable %s metadata ignored; LoRA scales default to 1", self.name,
                            PEFT_METADATA_KEY)
                return None
            return {k.removeprefix("transformer."): v for k, v in config.items()
                    if not k.startswith(("text_encoder", "unet."))}
        sidecar = self.path.with_name("adapter_config.json")
        if sidecar.is_file():
            try:
                return json.loads(sidecar.read_text())
            except ValueError:
                log.warning("%s: unreadable %s ignored; LoRA scales default to 1", self.name, sidecar.name)
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
        alpha = None if alpha is None else float(alpha.float().reshape(-1)[0])
        if algorithm == "lora":
            self._need(group, w, "down", "up")
            if "mid" in w:
                raise LoadError(f"{self.name}: {group.params['mid']} is a Tucker (conv) LoRA core; AuraFlow's "
                                f"transformer has no conv layers, so this file is for another model.")
            down, up = w["down"], w["up"]
            self._check(down.dim() == 2 and up.dim() == 2 and down.shape[0] == up.shape[1], group,
                        f"down {tuple(down.shape)} and up {tuple(up.shape)} do not chain")
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
            self._check(w1.shape == w2.shape, group, f"the two Hadamard factors are {w1.shape} and {w2.shape}")
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
        lora_alpha = cfg.get("lora_alpha", rank)
        # peft's rule: the first pattern that ends the module name at a dot boundary
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            try:
                hit = re.match(rf"(.*\.)?({pattern})$", layer_name)
            except re.error:
                raise LoadError(f"{self.name}: alpha_pattern {pattern!r} in its peft config is no regular "
                                f"expression; fix the metadata or remove the alpha_pattern entry.") from None
            if hit:
                lora_alpha = value
                break
        return rank_scale(lora_alpha, rank, rs=bool(cfg.get("use_rslora")))

    def _factor(self, group, w, stem, core, full_allowed=True) -> Factor:
        if full_allowed and f"{stem}" in w:
            return Factor(full=w[stem])
        self._need(group, w, f"{stem}_a", f"{stem}_b")
        a, b, t = w[f"{stem}_a"], w[f"{stem}_b"], w.get(core)
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
