"""A batch job as a ComfyUI prompt: where a job's parameters go in an API-format workflow, found once, then filled
per job (the ComfyUI backend, `aura_flow.batch.comfyui`, sends the result).

- A workflow with one generator node (AuraFlowGenerate, AuraFlowRemoteGenerate: a node with a ``prompt`` value
  input) takes every generation key under its own name on that node; the save node's ``format``/``quality`` take
  ``output_format``/``output_quality``.
- Any other workflow (KSampler, AuraFlowSampler...): ``prompt``/``negative_prompt`` go into the ``text`` of the
  nodes the sampler's ``positive``/``negative`` inputs link to; every other key into each node input of its name
  (``sampler`` is also ``sampler_name``, ``number_of_images`` also ``batch_size``, ``seed`` also ``noise_seed``).
  A key the workflow has no input for is left out (said once, at check time).
- ``loras`` fill the workflow's LoRA loader nodes in node order (name and strength); loaders a job leaves unused get
  strength 0. A job with more LoRAs than the workflow has loaders is an error, as are LoRAs in a workflow with none.
- The job's ``NODE.INPUT`` keys are applied last, as ``queue --set`` applies them (`aura_flow.headless.apply_sets`).
"""
from __future__ import annotations

import json
import logging

from ..errors import ParameterError, shown
from ..headless import apply_sets, load_workflow
from ..headless.workflow import check_workflow
from .model import GENERATION_KEYS

log = logging.getLogger(__name__)

ALIASES = {"sampler": ("sampler", "sampler_name"), "number_of_images": ("number_of_images", "batch_size"),
           "seed": ("seed", "noise_seed")}
SAVE_INPUTS = {"output_format": "format", "output_quality": "quality"}
# LoRA loader nodes: (class_type, name input, strength inputs)
LORA_LOADERS = {"AuraFlowLoraLoader": ("lora_name", ("strength",)),
                "LoraLoaderModelOnly": ("lora_name", ("strength_model",)),
                "LoraLoader": ("lora_name", ("strength_model", "strength_clip"))}


def _is_value(value) -> bool:
    """A widget value, not a link ``[node_id, output]``."""
    return not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str))


def _node_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


class WorkflowPlan:
    """Where each job key goes in ``workflow`` (an API-format dict, or a path to one)."""

    def __init__(self, workflow, where: str = "--workflow"):
        self.prompt = load_workflow(workflow) if not isinstance(workflow, dict) else check_workflow(workflow, where)
        self.where = where if isinstance(workflow, dict) else str(workflow)
        self.targets: dict[str, list[tuple[str, str]]] = {key: [] for key in GENERATION_KEYS}
        nodes = sorted(self.prompt.items(), key=lambda item: _node_key(item[0]))
        generators = [i for i, n in nodes if isinstance(n.get("inputs", {}).get("prompt"), str)]
        if len(generators) == 1:
            inputs = self.prompt[generators[0]]["inputs"]
            for key in GENERATION_KEYS:
                if key in inputs and _is_value(inputs[key]):
                    self.targets[key].append((generators[0], key))
        else:
            self._generic(nodes)
        for node_id, node in nodes:  # the save node's own format and quality
            inputs = node.get("inputs", {})
            for key, name in SAVE_INPUTS.items():
                if name in inputs and _is_value(inputs[name]) and "images" in inputs:
                    self.targets[key].append((node_id, name))
        self.loras = [(node_id, *LORA_LOADERS[n["class_type"]]) for node_id, n in nodes
                      if n["class_type"] in LORA_LOADERS]
        if not self.targets["prompt"]:
            raise ParameterError(f"{self.where}: no node takes the job's prompt (no node with a prompt input, no "
                                 "sampler whose positive input links to a node with a text input); use a workflow "
                                 "with AuraFlowGenerate or a sampler and text encoders")
        unused = [key for key, found in self.targets.items() if not found]
        if unused:
            log.warning("%s: no input for %s; the jobs' values for these are not used", self.where, ", ".join(unused))

    def _generic(self, nodes) -> None:
        for node_id, node in nodes:
            inputs = node.get("inputs", {})
            for key, side in (("prompt", "positive"), ("negative_prompt", "negative")):
                link = inputs.get(side)
                if isinstance(link, list) and not _is_value(link) and link[0] in self.prompt:
                    text_inputs = self.prompt[link[0]].get("inputs", {})
                    if isinstance(text_inputs.get("text"), str) and (link[0], "text") not in self.targets[key]:
                        self.targets[key].append((link[0], "text"))
            for key in GENERATION_KEYS:
                if key in ("prompt", "negative_prompt") or key in SAVE_INPUTS:
                    continue
                for name in ALIASES.get(key, (key,)):
                    if name in inputs and _is_value(inputs[name]):
                        self.targets[key].append((node_id, name))

    def check_job(self, job) -> None:
        """ParameterError naming the key when the job's LoRAs or ``NODE.INPUT`` keys do not fit the workflow."""
        self.fill(job)

    def fill(self, job) -> dict:
        """The workflow with ``job``'s parameters, LoRAs and ``NODE.INPUT`` keys in place (a new dict)."""
        prompt = json.loads(json.dumps(self.prompt))
        for key, places in self.targets.items():
            for node_id, name in places:
                prompt[node_id]["inputs"][name] = job.params[key]
        if job.loras:
            if len(job.loras) > len(self.loras):
                have = (f"only {len(self.loras)} LoRA loader node(s) ({', '.join(n for n, *_ in self.loras)})"
                        if self.loras else "no LoRA loader node (AuraFlow LoRA Loader, LoraLoader...)")
                raise ParameterError(f"loras: the job has {len(job.loras)} LoRA(s) but the workflow "
                                     f"{self.where} has {have}; add loaders to the workflow or drop loras")
            for i, (node_id, name_input, strengths) in enumerate(self.loras):
                inputs = prompt[node_id]["inputs"]
                if i < len(job.loras):
                    inputs[name_input] = str(job.loras[i][0])
                for strength in strengths:
                    inputs[strength] = float(job.loras[i][1]) if i < len(job.loras) else 0.0
        for key, value in job.sets:
            try:
                prompt = apply_sets(prompt, [f"{key}={json.dumps(value)}"])
            except ParameterError as exc:  # "--set ITEM: why" said as "line N: KEY=VALUE: why"
                why = str(exc).removeprefix("--set ").split(": ", 1)[-1]
                raise ParameterError(f"{key}={shown(value)}: {why}") from None
            except (TypeError, ValueError):
                raise ParameterError(f"{key}={shown(value)}: the value is not JSON") from None
        return prompt


__all__ = ["WorkflowPlan", "LORA_LOADERS"]
