"""Matching LoRA files onto a loaded transformer and switching them on.

`prepare_lora` matches a file's modules onto the transformer's `PatchableLinear` layers (by diffusers module name,
whatever spelling the file uses), reads only the matched tensors, checks every shape and builds the patches once.
`apply_loras` then sets every layer's ``patches`` tuple from a list of ``(lora, strength)``: the stored weights
never change, so applying ``[]`` gives back the base model exactly and switching LoRAs or strengths is instant.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import LoadError, ParameterError, shown
from ..weights.linear import patchable_layers
from .formats import LoraFile
from .keys import LayerIndex, looks_like
from .patches import DoraPatch, PermutedRows, swap_halves

log = logging.getLogger(__name__)

MAX_STRENGTH = 100.0  # ComfyUI's LoRA loaders' range; beyond it the weights overflow

SHOW = 5  # names listed in a message before "(+N more)"


def _some(names) -> str:
    names = list(names)
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


@dataclass
class LoraReport:
    """What one LoRA file did to the transformer: the record for logs, the UI and image metadata."""
    name: str
    path: str
    styles: list[str]                 # e.g. ["lycoris lokr"], ["diffusers/peft lora"]
    modules: int                      # LoRA modules in the file (text-encoder ones included)
    matched: int                      # ...that patch a transformer layer
    keys_matched: int
    keys: int
    text_encoder: int = 0             # modules for a text encoder, ignored
    unmatched: list[str] = field(default_factory=list)      # module paths that match no layer
    unsupported_keys: list[str] = field(default_factory=list)  # keys with no known LoRA parameter
    strength: float | None = None
    warnings: list[str] = field(default_factory=list)
    hash: str | None = None  # aura_flow.provenance.file_hash of the file, when the caller computed it

    def metadata(self) -> dict:
        """The short record to embed in an image or a workflow (never the file's full path)."""
        return {"name": self.name, "strength": self.strength, "format": ", ".join(self.styles),
                "layers": self.matched, "hash": self.hash}


@dataclass
class PreparedLora:
    """A LoRA file matched onto one transformer: ``patches`` maps a layer name to its patch (tensors already read and
    placed on the layer's device). Reuse it to switch strengths without reading the file again."""
    file: LoraFile
    patches: dict
    report: LoraReport
    transformer_ref: object  # weakref.ref to the transformer it was matched onto


def prepare_lora(lora, transformer) -> PreparedLora:
    """Match ``lora`` (a path or a `LoraFile`) onto ``transformer``'s patchable layers and build its patches.

    Raises `LoadError` when no module matches (naming what the file looks like) or a shape does not fit; a partial
    match is logged as a warning and recorded in the report."""
    file = lora if isinstance(lora, LoraFile) else LoraFile(lora)
    layers = patchable_layers(transformer)
    if not layers:
        raise LoadError(f"{file.name}: the transformer has no patchable layers; load it with aura_flow.load.")
    index = LayerIndex(layers)
    text_groups = {g.path for g in file.text_encoder_groups()}
    matches, unmatched = {}, []
    for path, group in file.groups.items():
        if path in text_groups:
            continue
        target = index.resolve(path)
        if target is None:
            unmatched.append(path)
            continue
        if target.layer in matches:
            raise LoadError(f"{file.name}: modules {matches[target.layer][0].path} and {path} both patch layer "
                            f"{target.layer}; the file mixes two copies of one LoRA. Keep one of them.")
        matches[target.layer] = (group, target)
    _refuse_unusable(file, matches, unmatched, text_groups)
    for layer_name, (group, _target) in matches.items():  # from the header: nothing oversized or odd is read
        file.check_sizes(group.params.values(), (layers[layer_name].out_features, layers[layer_name].in_features))

    tensors = file.read([key for group, _ in matches.values() for key in group.params.values()])  # only these
    patches = {}
    for layer_name, (group, target) in matches.items():
        layer = layers[layer_name]
        patch, magnitude = file.make_patch(group, layer_name, tensors)
        expected = (layer.out_features, layer.in_features)
        if tuple(patch.shape) != expected:
            key = next(iter(group.params.values()))
            raise LoadError(f"{file.name}: {key} makes a change of shape {tuple(patch.shape)} for layer {layer_name}, "
                            f"whose weight is {expected}. The LoRA was trained for a different model or AuraFlow "
                            f"size; use one made for this checkpoint.")
        out_f, in_f = expected
        if magnitude is not None and tuple(magnitude.shape) not in ((out_f,), (out_f, 1), (1, in_f)):
            raise LoadError(f"{file.name}: DoRA magnitude of {group.path} has shape {tuple(magnitude.shape)}, expected "
                            f"({out_f},), ({out_f}, 1) or (1, {in_f}) for layer {layer_name}. The file is damaged or "
                            "for another model.")
        if target.swapped_halves:  # the file's rows are in the original layout: (shift, scale) <-> (scale, shift)
            perm = swap_halves(out_f)
            patch = PermutedRows(patch, perm)
            if magnitude is not None and magnitude.shape[0] == out_f and tuple(magnitude.shape) != (1, in_f):
                magnitude = magnitude[perm]
        if magnitude is not None:
            patch = DoraPatch.of(patch, magnitude, layer)
        if layer.weight.device.type != "meta":
            patch = patch.to(layer.weight.device)
        patches[layer_name] = patch

    keys_matched = sum(len(g.params) for g, _ in matches.values())
    report = LoraReport(name=file.name, path=str(file.path), styles=sorted({g.style for g, _ in matches.values()}),
                        modules=len(file.groups), matched=len(matches), keys_matched=keys_matched,
                        keys=len(file.keys), text_encoder=len(text_groups), unmatched=sorted(unmatched),
                        unsupported_keys=sorted(file.unknown_keys))
    _warn_partial(report)
    log.info("LoRA %s: %s, %d of %d modules patch %d transformer layers", file.name, ", ".join(report.styles),
             report.matched, report.modules, len(patches))
    return PreparedLora(file, patches, report, weakref.ref(transformer))


def _refuse_unusable(file: LoraFile, matches, unmatched, text_groups):
    if matches:
        return
    if not file.groups:
        raise LoadError(f"{file.name}: no LoRA weights found (saw keys like {_some(file.keys)}). This loader reads "
                        f"LoRA, LoKr, LoHa and full-diff files; a model checkpoint goes in the model loader.")
    if not unmatched:
        raise LoadError(f"{file.name}: all its {len(text_groups)} LoRA modules are for a text encoder (e.g. "
                        f"{_some(sorted(text_groups))}). LoRAs apply to the AuraFlow transformer only, so this file "
                        f"would change nothing; pick a LoRA trained on the transformer.")
    what = looks_like(unmatched)
    seems = f"it looks like {what}" if what else "its layer names are not AuraFlow's"
    raise LoadError(f"{file.name}: none of its {len(unmatched)} LoRA modules matches an AuraFlow transformer layer; "
                    f"{seems} (e.g. {_some(sorted(unmatched))}). Use it with the model it was made for, or pick an "
                    f"AuraFlow LoRA.")


def _warn_partial(report: LoraReport):
    if report.unmatched:
        what = looks_like(report.unmatched)
        hint = f"; those look like {what}" if what else ""
        report.warnings.append(f"{report.name}: only {report.matched} of {report.modules - report.text_encoder} "
                               f"transformer modules ({report.keys_matched} of {report.keys} keys) match AuraFlow "
                               f"layers; not matched: {_some(report.unmatched)}{hint}. The LoRA may have been made "
                               f"for another model or AuraFlow variant.")
    if report.text_encoder:
        report.warnings.append(f"{report.name}: {report.text_encoder} text-encoder modules ignored (LoRAs apply to "
                               f"the transformer only).")
    if report.unsupported_keys:
        report.warnings.append(f"{report.name}: {len(report.unsupported_keys)} keys of no known LoRA parameter "
                               f"ignored: {_some(report.unsupported_keys)}.")
    for message in report.warnings:
        log.warning(message)


@dataclass
class ApplyReport:
    """The LoRAs now active on a transformer."""
    loras: list[LoraReport]
    layers_patched: int

    def metadata(self) -> list[dict]:
        return [r.metadata() for r in self.loras]


def apply_loras(transformer, loras, *, warn_repeats: bool = True) -> ApplyReport:
    """Make exactly ``loras`` (a list of ``(lora, strength)``; a lora is a path, a `LoraFile` or a `PreparedLora`)
    active on ``transformer``: every patchable layer's ``patches`` is replaced, so ``[]`` removes all. Several LoRAs
    stack (the same file twice too, with a warning unless ``warn_repeats=False``); a strength is a number in -100..100 as in ComfyUI's LoRA loaders (negative subtracts, 0 skips; beyond
    that the weights overflow into a NaN image). Everything is checked before any layer changes.
    """
    layers = patchable_layers(transformer)
    planned = {name: [] for name in layers}
    reports = []
    for item in loras:
        try:
            lora, strength = item
        except (TypeError, ValueError):
            raise ParameterError(f"loras: each item is (lora, strength), got {item!r}") from None
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            strength = math.nan
        if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
            raise ParameterError(f"loras: strength of {_label(lora)} is {shown(item[1])}; use a finite number in "
                                 f"-{MAX_STRENGTH:g}..{MAX_STRENGTH:g} (1.0 is the LoRA as trained, 0 turns it off, "
                                 "negative values subtract it)")
        if not isinstance(lora, PreparedLora) or lora.transformer_ref() is not transformer:
            lora = prepare_lora(lora.file if isinstance(lora, PreparedLora) else lora, transformer)
        report = replace(lora.report, strength=strength)
        reports.append(report)
        if strength == 0.0:
            continue
        for name, patch in lora.patches.items():
            planned[name].append((patch, strength))
    if warn_repeats:
        warn_repeated([r.path for r in reports], [r.name for r in reports])
    for name, layer in layers.items():
        layer.patches = tuple(planned[name])
    patched = sum(1 for p in planned.values() if p)
    if reports:
        log.info("LoRAs active: %s (%d layers patched)",
                 ", ".join(f"{r.name}@{r.strength:g}" for r in reports), patched)
    return ApplyReport(reports, patched)


def warn_repeated(paths, names) -> list[str]:
    """Log a warning for each file that comes more than once in a LoRA list (their strengths add up, which is
    rarely meant); -> the messages."""
    seen, messages = {}, []
    for path, name in zip(paths, names):
        seen.setdefault(str(Path(path).resolve()), []).append(name)
    for path, names_of in seen.items():
        if len(names_of) > 1:
            messages.append(f"{names_of[0]}: the same LoRA is given {len(names_of)} times ({path}); its strengths add "
                            "up. Give it once with the strength you want")
            log.warning(messages[-1])
    return messages


def _label(lora) -> str:
    if isinstance(lora, PreparedLora):
        return lora.file.name
    if isinstance(lora, LoraFile):
        return lora.name
    return Path(str(lora)).name
